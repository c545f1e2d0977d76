"""The gateway end to end: the real coordinator on 127.0.0.1:0, real tunnels from agents'
ServiceTunnels, a small OpenAI-style server of ours behind each, the official client."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support.fake_openai import FakeOpenAI
from support.gateway import (
    coordinator_with_gateway,
    new_key,
    replica,
    report,
    service_spec,
    streaming_request,
    until,
)

from agent.link.identity import load_or_create
from agent.protocol import crypto
from agent.services.tunnel import tunnel_url
from coordinator.server import Coordinator

_TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    async with coordinator_with_gateway(tmp_path) as server:
        yield server


@pytest.fixture
async def servers() -> AsyncIterator[tuple[FakeOpenAI, FakeOpenAI]]:
    a, b = FakeOpenAI("server-a"), FakeOpenAI("server-b")
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


def _client(coordinator: Coordinator, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=coordinator.gateway_url, api_key=key, max_retries=0, timeout=20
    )


async def _records(coordinator: Coordinator, count: int) -> list[dict[str, Any]]:
    """The newest ``count`` request records, once they are written."""

    def written() -> bool:
        coordinator.gateway.records.flush()
        return len(coordinator.store.requests.recent(count)) >= count

    await until(written, f"{count} request record(s)")
    async with httpx.AsyncClient(trust_env=False) as client:
        answer = await client.get(f"{coordinator.dashboard_url}api/requests?limit={count}")
    records: list[dict[str, Any]] = answer.json()["requests"]
    return records


async def _drain(chunks: AsyncIterator[Any]) -> None:
    """Read a stream to its end; a hang fails the test."""
    async with asyncio.timeout(10):
        async for _ in chunks:
            pass


async def test_a_chat_completion_is_answered_by_a_replica_and_recorded_with_its_usage(
    coordinator: Coordinator, servers: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    a, _ = servers
    key = new_key(coordinator)
    async with (
        replica(coordinator, "svc-a", ("127.0.0.1", a.port), ["tiny"]) as one,
        _client(coordinator, key) as client,
    ):
        answer = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}]
        )
        embedded = await client.embeddings.create(model="tiny", input="hi")
    assert answer.choices[0].message.content == "t0 t1 t2 t3 t4"
    assert answer.system_fingerprint == "server-a"
    assert embedded.data[0].embedding == [0.5, 0.25]
    assert a.requests[0]["messages"] == [{"role": "user", "content": "hi"}]
    embedding, chat = await _records(coordinator, 2)
    assert chat["path"] == "/v1/chat/completions"
    assert (chat["node_id"], chat["job_id"], chat["model"]) == (one.node_id, "svc-a", "tiny")
    assert (chat["status"], chat["code"], chat["attempts"]) == (200, "", 1)
    assert (chat["tokens_in"], chat["tokens_out"]) == (7, 5)
    assert chat["key_id"].startswith("key-")
    assert key not in json.dumps(chat)
    assert chat["ttfb_s"] is not None
    assert chat["latency_s"] >= chat["ttfb_s"]
    assert (embedding["path"], embedding["tokens_in"]) == ("/v1/embeddings", 3)


async def test_a_token_stream_passes_event_by_event_and_its_last_usage_is_recorded(
    coordinator: Coordinator, servers: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    a, _ = servers
    a.tokens = 40
    async with (
        replica(coordinator, "svc-a", ("127.0.0.1", a.port), ["tiny"]),
        _client(coordinator, new_key(coordinator)) as client,
    ):
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
    assert pieces == [f"t{n} " for n in range(40)]
    (record,) = await _records(coordinator, 1)
    assert (record["stream"], record["tokens_in"], record["tokens_out"]) == (True, 7, 40)
    assert record["ttft_s"] is not None
    assert record["ttft_s"] <= record["latency_s"]


async def test_models_are_those_of_the_ready_replicas_only(
    coordinator: Coordinator, servers: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    a, b = servers
    async with (
        replica(coordinator, "svc-a", ("127.0.0.1", a.port), ["tiny", "tiny-chat"]),
        replica(coordinator, "svc-b", ("127.0.0.1", b.port), ["other"]) as two,
        _client(coordinator, new_key(coordinator)) as client,
    ):
        assert sorted(m.id for m in (await client.models.list()).data) == [
            "other",
            "tiny",
            "tiny-chat",
        ]
        report(coordinator, two.node_id, "svc-b", "unhealthy")
        assert sorted(m.id for m in (await client.models.list()).data) == ["tiny", "tiny-chat"]
        # Known but not ready: 503, not 404.
        with pytest.raises(openai.InternalServerError) as busy:
            await client.completions.create(model="other", prompt="hi")
        assert busy.value.status_code == 503
        assert busy.value.code == "no_ready_replica"


async def test_a_bad_or_revoked_key_is_401_and_reaches_no_replica(
    coordinator: Coordinator, servers: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    a, _ = servers
    key = new_key(coordinator)
    async with replica(coordinator, "svc-a", ("127.0.0.1", a.port), ["tiny"]):
        for bad in ("gpk-not-a-key", key + "x"):
            async with _client(coordinator, bad) as client:
                with pytest.raises(openai.AuthenticationError) as refused:
                    await client.completions.create(model="tiny", prompt="hi")
            assert refused.value.code == "invalid_api_key"
        async with httpx.AsyncClient(trust_env=False) as raw:
            bare = await raw.post(f"{coordinator.gateway_url}/completions", json={"model": "tiny"})
        assert (bare.status_code, bare.headers["www-authenticate"]) == (401, "Bearer")
        [stored] = coordinator.store.api_keys.all()
        coordinator.store.api_keys.revoke(stored.key_id, 0.0)
        async with _client(coordinator, key) as client:
            with pytest.raises(openai.AuthenticationError):
                await client.completions.create(model="tiny", prompt="hi")
    assert a.requests == []


async def test_a_flood_from_one_key_gets_429_while_another_key_is_served(
    coordinator: Coordinator, servers: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    a, _ = servers
    flooding, other = new_key(coordinator, rate_per_min=3), new_key(coordinator, rate_per_min=3)
    async with (
        replica(coordinator, "svc-a", ("127.0.0.1", a.port), ["tiny"]),
        httpx.AsyncClient(trust_env=False) as raw,
    ):

        async def call(key: str) -> httpx.Response:
            return await raw.post(
                f"{coordinator.gateway_url}/completions",
                json={"model": "tiny", "prompt": "hi"},
                headers={"authorization": f"Bearer {key}"},
            )

        flood = await asyncio.gather(*(call(flooding) for _ in range(10)))
        served = await call(other)
    assert sorted(r.status_code for r in flood) == [200] * 3 + [429] * 7
    refused = next(r for r in flood if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 20  # a token each 20 s
    assert served.status_code == 200
    assert len(a.requests) == 4


async def test_an_unknown_model_is_404_and_a_malformed_body_400(
    coordinator: Coordinator, servers: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    a, _ = servers
    key = new_key(coordinator)
    async with (
        replica(coordinator, "svc-a", ("127.0.0.1", a.port), ["tiny"]),
        _client(coordinator, key) as client,
    ):
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="huge", messages=[])
        assert missing.value.code == "model_not_found"
        async with httpx.AsyncClient(trust_env=False) as raw:
            headers = {"authorization": f"Bearer {key}"}
            url = f"{coordinator.gateway_url}/chat/completions"
            for body in (b"not json", b"[1]", b'{"model": 3}', b"{}"):
                bad = await raw.post(url, content=body, headers=headers)
                assert (bad.status_code, bad.json()["error"]["code"]) == (400, "bad_request")
            other = await raw.get(f"{coordinator.gateway_url}/files", headers=headers)
            assert (other.status_code, other.json()["error"]["code"]) == (404, "not_found")
    assert a.requests == []


async def test_requests_take_turns_over_the_replicas_of_a_model(
    coordinator: Coordinator, servers: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    a, b = servers
    async with (
        replica(coordinator, "svc-a", ("127.0.0.1", a.port), ["tiny"]),
        replica(coordinator, "svc-b", ("127.0.0.1", b.port), ["tiny"]),
        _client(coordinator, new_key(coordinator)) as client,
    ):
        served = [
            (await client.completions.create(model="tiny", prompt="hi")).system_fingerprint
            for _ in range(6)
        ]
    assert sorted(str(name) for name in served) == ["server-a"] * 3 + ["server-b"] * 3


async def test_a_request_failing_before_its_first_byte_is_retried_on_another_replica(
    coordinator: Coordinator, servers: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    a, b = servers
    a.mode = "reset"
    async with (
        replica(coordinator, "svc-a", ("127.0.0.1", a.port), ["tiny"]),
        replica(coordinator, "svc-b", ("127.0.0.1", b.port), ["tiny"]),
        _client(coordinator, new_key(coordinator)) as client,
    ):
        served = [
            (await client.completions.create(model="tiny", prompt="hi")).system_fingerprint
            for _ in range(4)
        ]
        b.mode = "reset"
        with pytest.raises(openai.APIStatusError) as failed:
            await client.completions.create(model="tiny", prompt="hi")
    assert served == ["server-b"] * 4
    assert len(a.requests) >= 2  # a's turns came, failed, and went to b
    assert (failed.value.status_code, failed.value.code) == (502, "upstream_error")
    records = await _records(coordinator, 5)
    assert records[0]["attempts"] == 2
    assert records[0]["code"] == "upstream_error"
    assert {r["attempts"] for r in records[1:] if r["job_id"] == "svc-b"} <= {1, 2}


async def test_a_client_gone_mid_stream_resets_the_stream_and_the_server_sees_it_closed(
    coordinator: Coordinator, servers: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    a, _ = servers
    a.mode = "hold"
    key = new_key(coordinator)
    async with replica(coordinator, "svc-a", ("127.0.0.1", a.port), ["tiny"]) as one:
        writer = await streaming_request(coordinator.gateway.port, key)
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(10):
            await a.closed.get()
        await until(lambda: coordinator.tunnels.open_streams(one.node_id) == 0, "the reset")
        (record,) = await _records(coordinator, 1)
    assert record["code"] == "client_gone"
    assert coordinator.gateway.connections == 0
    assert coordinator.gateway.proxy.router.outstanding("svc-a") == 0


async def test_a_replica_killed_mid_stream_ends_the_stream_with_an_error_and_the_next_request_goes_to_the_other(  # noqa: E501
    coordinator: Coordinator, servers: tuple[FakeOpenAI, FakeOpenAI], tmp_path: Path
) -> None:
    a, b = servers
    a.mode = "hold"
    # The killed node's tunnel is a process of its own (support.tunnel_agent, target "web").
    identity = load_or_create(tmp_path / "identity")
    coordinator.store.nodes.seen(identity.node_id, identity.public_key_b64, 0.0)
    key = coordinator.key
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "support.tunnel_agent",
        tunnel_url(coordinator.url),
        str(tmp_path / "identity"),
        key.key_id,
        crypto.b64encode(key.public_key),
        str(a.port),
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(_TESTS), str(_TESTS.parent)])},
    )
    try:
        await until(lambda: identity.node_id in coordinator.tunnels.connected(), "the tunnel")
        await coordinator.submit(identity.node_id, service_spec(["tiny"]), job_id="web")
        report(coordinator, identity.node_id, "web", "ready")
        async with (
            _client(coordinator, new_key(coordinator)) as client,
            replica(coordinator, "svc-b", ("127.0.0.1", b.port), ["tiny"]),
        ):
            # Two replicas, none busy: the first request goes to the first in turn.
            stream = await client.chat.completions.create(model="tiny", messages=[], stream=True)
            if not a.requests:  # b took it: the next one is a's turn
                async for _ in stream:
                    pass
                stream = await client.chat.completions.create(
                    model="tiny", messages=[], stream=True
                )
            chunks = aiter(stream)
            first = await anext(chunks)
            assert first.system_fingerprint == "server-a"
            process.kill()
            await process.wait()
            with pytest.raises(openai.APIError) as broken:
                await _drain(chunks)
            assert isinstance(broken.value.body, dict)
            assert broken.value.body["code"] == "upstream_error"
            after = [
                (await client.completions.create(model="tiny", prompt="hi")).system_fingerprint
                for _ in range(3)
            ]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert after == ["server-b"] * 3
    records = await _records(coordinator, 4)
    assert records[-1]["job_id"] == "web"
    assert records[-1]["code"] == "upstream_error"
