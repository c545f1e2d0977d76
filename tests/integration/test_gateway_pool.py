"""The gateway keeps connections to a service alive between requests (through the real
tunnel, to a server of ours that counts its connections), and only when HTTP allows it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from support.fake_openai import FakeOpenAI
from support.gateway import coordinator_with_gateway, new_key, replica, report, until

from coordinator.server import Coordinator


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    async with coordinator_with_gateway(tmp_path) as server:
        yield server


@pytest.fixture
async def kept() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI("kept", keep_alive=True)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def closing() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI("closing")
    await server.start()
    yield server
    await server.stop()


def _client(coordinator: Coordinator) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=coordinator.gateway_url, api_key=new_key(coordinator), max_retries=0, timeout=20
    )


async def _complete(client: openai.AsyncOpenAI, model: str = "tiny") -> str:
    answer = await client.completions.create(model=model, prompt="hi")
    return answer.choices[0].text


async def test_two_requests_in_a_row_reach_the_server_on_one_connection(
    coordinator: Coordinator, kept: FakeOpenAI
) -> None:
    pool = coordinator.gateway.proxy.pool
    async with (
        replica(coordinator, "svc-a", ("127.0.0.1", kept.port), ["tiny"]) as one,
        _client(coordinator) as client,
    ):
        assert await _complete(client) == "t0 t1 t2 t3 t4"
        assert await _complete(client) == "t0 t1 t2 t3 t4"
        assert (len(kept.requests), kept.connections) == (2, 1)
        assert pool.idle("svc-a") == 1
        assert one.tunnel.streams_to("svc-a") == 1  # the kept stream, idle


async def test_an_answer_that_closes_its_connection_is_not_kept(
    coordinator: Coordinator, closing: FakeOpenAI, kept: FakeOpenAI
) -> None:
    pool = coordinator.gateway.proxy.pool
    async with (
        replica(coordinator, "svc-a", ("127.0.0.1", closing.port), ["tiny"]) as one,
        replica(coordinator, "svc-b", ("127.0.0.1", kept.port), ["other"]) as two,
        _client(coordinator) as client,
    ):
        # Connection: close said.
        await _complete(client)
        await _complete(client)
        assert (len(closing.requests), closing.connections) == (2, 2)
        assert pool.idle("svc-a") == 0
        await until(lambda: one.tunnel.streams_to("svc-a") == 0, "the streams over")
        # A stream's answer ends with its connection (no length, not chunked).
        stream = await client.completions.create(model="other", prompt="hi", stream=True)
        assert len([c async for c in stream if c.choices]) == 5
        await _complete(client, "other")
        assert (len(kept.requests), kept.connections) == (2, 2)
        assert pool.idle("svc-b") == 1
        await until(lambda: two.tunnel.streams_to("svc-b") == 1, "the stream's end")


async def test_a_kept_connection_closed_by_its_server_is_retried_once_on_a_new_one(
    coordinator: Coordinator, kept: FakeOpenAI
) -> None:
    async with (
        replica(coordinator, "svc-a", ("127.0.0.1", kept.port), ["tiny"]),
        _client(coordinator) as client,
    ):
        await _complete(client)
        # The server drops its kept connection as the next request comes, before a byte.
        kept.mode = "drop_kept"
        assert await _complete(client) == "t0 t1 t2 t3 t4"
    # The dropped request, then the same on a new connection, on the one replica.
    assert (len(kept.requests), kept.connections) == (3, 2)
    coordinator.gateway.records.flush()
    (newest,) = coordinator.store.requests.recent(1)
    assert (newest.status, newest.code, newest.job_id, newest.attempts) == (200, "", "svc-a", 1)


async def test_idle_streams_close_after_their_time_and_when_their_replica_is_not_ready(
    coordinator: Coordinator, kept: FakeOpenAI, closing: FakeOpenAI
) -> None:
    pool = coordinator.gateway.proxy.pool
    async with (
        replica(coordinator, "svc-a", ("127.0.0.1", kept.port), ["tiny"]) as one,
        replica(coordinator, "svc-b", ("127.0.0.1", closing.port), ["other"]),
        _client(coordinator) as client,
    ):
        pool.idle_s = 0.1
        await _complete(client)
        # Its idle time over, the kept stream is closed: the agent sees none left.
        await until(lambda: one.tunnel.streams_to("svc-a") == 0, "the idle stream closed")
        assert pool.idle("svc-a") == 0
        pool.idle_s = 60.0
        await _complete(client)
        assert pool.idle("svc-a") == 1
        # Not ready (a drain says so): the next request anywhere closes its idle stream,
        # which a draining node would count as a request in flight.
        report(coordinator, one.node_id, "svc-a", "unhealthy")
        await _complete(client, "other")
        assert pool.idle("svc-a") == 0
        await until(lambda: one.tunnel.streams_to("svc-a") == 0, "the stream closed")
