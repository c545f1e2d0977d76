"""The gateways of several coordinators on one PostgreSQL act as one: any serves a model
whose replica's tunnel ends at another (it asks that one for a stream,
coordinator/gateway/peer.py, and only a coordinator of the network may ask), a key's rate
is one over all of them, and a key revoked through one is refused by the others."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import msgspec
import openai
import pytest
from support.fake_openai import FakeOpenAI
from support.gateway import (
    SETTINGS,
    Replica,
    assert_window_grew,
    fetch_bulk,
    new_key,
    replica,
    streaming_request,
    until,
    window_grants,
)
from support.processes import free_port
from support.tunnel_target import Target

from coordinator import keys
from coordinator.gateway.peer import PeerAuth
from coordinator.gateway.proxy import UNKNOWN_KEYS_PER_MIN
from coordinator.gateway.server import GatewaySettings
from coordinator.server import Coordinator


@asynccontextmanager
async def two_coordinators(
    url: str, tmp_path: Path, settings: GatewaySettings = SETTINGS
) -> AsyncIterator[list[Coordinator]]:
    """Two coordinators on the database at ``url`` with one key, each giving its gateway's
    address to the other."""
    keys.load_or_create(tmp_path / "a")
    (tmp_path / "b").mkdir(mode=0o700)
    shutil.copy2(tmp_path / "a" / keys.KEY_FILE, tmp_path / "b" / keys.KEY_FILE)
    async with AsyncExitStack() as stack:
        started = []
        for name in ("a", "b"):
            port = free_port()
            coordinator = Coordinator(
                db_path=url,
                state_dir=tmp_path / name,
                gateway_port=port,
                gateway_settings=settings,
                peer_url=f"http://127.0.0.1:{port}",
            )
            started.append(await stack.enter_async_context(coordinator))
        yield started


class World(msgspec.Struct, kw_only=True):
    """Two coordinators, and a replica whose tunnel ends at ``b``, as ``a`` sees it."""

    a: Coordinator
    b: Coordinator
    server: FakeOpenAI
    held: Replica


@asynccontextmanager
async def held_by_b(
    url: str, tmp_path: Path, settings: GatewaySettings = SETTINGS, *, keep_alive: bool = False
) -> AsyncIterator[World]:
    """A replica of ``tiny`` on a node whose tunnel ends at ``b``, once ``a`` sees it so."""
    server = FakeOpenAI("behind-b", keep_alive=keep_alive)
    await server.start()
    try:
        async with (
            two_coordinators(url, tmp_path, settings) as (a, b),
            replica(b, "svc-b", ("127.0.0.1", server.port), ["tiny"]) as held,
        ):
            a_id = a.coordinator_id
            await until(
                lambda: held.node_id in a.store.presence.peer_tunnels(a_id, time.time()),
                "b's tunnel, in the store",
            )
            yield World(a=a, b=b, server=server, held=held)
    finally:
        await server.stop()


def _client(coordinator: Coordinator, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=coordinator.gateway_url, api_key=key, max_retries=0, timeout=20
    )


async def test_a_request_to_one_coordinator_is_served_by_a_replica_tunnelled_to_the_other(
    postgres_url: str, tmp_path: Path
) -> None:
    async with held_by_b(postgres_url, tmp_path) as world:
        a, b, server, held = world.a, world.b, world.server, world.held
        assert held.node_id not in a.tunnels.connected()
        async with _client(a, new_key(a)) as client:
            answer = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}]
            )
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "again"}], stream=True
            )
            pieces = [c.choices[0].delta.content async for c in stream if c.choices]
            models = [m.id for m in (await client.models.list()).data]
            # Recorded once, by the gateway that took the request and its key.
            for coordinator in (a, b):
                coordinator.gateway.records.flush()
        records = a.store.requests.recent(10)
    assert answer.choices[0].message.content == "t0 t1 t2 t3 t4"
    assert answer.system_fingerprint == "behind-b"
    assert pieces == [f"t{n} " for n in range(5)]
    assert models == ["tiny"]
    assert [r["messages"][0]["content"] for r in server.requests] == ["hi", "again"]
    chats = [(r.node_id, r.job_id, r.status) for r in records if r.path != "/v1/models"]
    assert chats == [(held.node_id, "svc-b", 200)] * 2


async def test_a_client_gone_mid_stream_through_a_peer_resets_the_holders_stream(
    postgres_url: str, tmp_path: Path
) -> None:
    async with held_by_b(postgres_url, tmp_path) as world:
        a, b, server, held = world.a, world.b, world.server, world.held
        server.mode = "hold"
        writer = await streaming_request(a.gateway.port, new_key(a))
        assert b.tunnels.open_streams(held.node_id) == 1
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(10):
            await server.closed.get()  # the service saw its connection closed
        await until(lambda: b.tunnels.open_streams(held.node_id) == 0, "the holder's reset")
        await until(lambda: b.gateway.connections == 0, "the peer's connection closed")


async def test_a_peers_streams_are_not_held_to_one_sources_share(
    postgres_url: str, tmp_path: Path
) -> None:
    limits = msgspec.structs.replace(SETTINGS.limits, max_connections_per_source=2)
    settings = msgspec.structs.replace(SETTINGS, limits=limits)
    async with held_by_b(postgres_url, tmp_path, settings) as world:
        a, b, server, held = world.a, world.b, world.server, world.held
        server.mode = "hold"
        key = new_key(a)
        # Three clients, each from an address of its own: a relays their streams to b,
        # one connection each, all from a's one address.
        sources = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
        writers = [await streaming_request(a.gateway.port, key, source=s) for s in sources]
        assert b.tunnels.open_streams(held.node_id) == 3
        for writer in writers:
            writer.close()
            await writer.wait_closed()
        await until(lambda: b.tunnels.open_streams(held.node_id) == 0, "the holder's resets")
        await until(lambda: b.gateway.connections == 0, "the peer's connections closed")


async def test_only_a_coordinator_of_the_network_gets_a_stream_from_a_peer(
    postgres_url: str, tmp_path: Path
) -> None:
    async with (
        held_by_b(postgres_url, tmp_path) as world,
        httpx.AsyncClient(trust_env=False, timeout=10) as http,
    ):
        b, server, held = world.b, world.server, world.held
        base = b.gateway_url.removesuffix("/v1")
        path = f"{base}/_peer/streams/{held.node_id}/svc-b"
        upgrade = {"connection": "upgrade", "upgrade": "gpu-agent-stream"}
        ours = PeerAuth(b.key)
        another = PeerAuth(keys.load_or_create(tmp_path / "other"))
        late = PeerAuth(b.key, clock=lambda: time.time() - 120)
        answers = [
            await http.get(path, headers=upgrade | extra)
            for extra in (
                {},
                {"gpu-peer-auth": another.header(held.node_id, "svc-b")},
                {"gpu-peer-auth": late.header(held.node_id, "svc-b")},
                {"gpu-peer-auth": ours.header(held.node_id, "svc-other")},  # not this job's
                {"gpu-peer-auth": "12:" + "0" * 64},
            )
        ]
        assert [(r.status_code, r.json()["error"]["code"]) for r in answers] == [
            (403, "bad_peer")
        ] * 5
        # A proof for a node whose tunnel is not there: nothing to relay.
        elsewhere = await http.get(
            f"{base}/_peer/streams/node-nowhere/svc-b",
            headers=upgrade | {"gpu-peer-auth": ours.header("node-nowhere", "svc-b")},
        )
        assert (elsewhere.status_code, elsewhere.json()["error"]["code"]) == (
            502,
            "upstream_error",
        )
        assert b.tunnels.open_streams(held.node_id) == 0
    assert server.connections == 0


async def test_a_keys_rate_is_one_over_every_coordinator_and_a_revocation_holds_on_all(
    postgres_url: str, tmp_path: Path
) -> None:
    async with (
        two_coordinators(postgres_url, tmp_path) as (a, b),
        httpx.AsyncClient(trust_env=False, timeout=10) as http,
    ):
        key = new_key(a, rate_per_min=3)
        auth = {"authorization": f"Bearer {key}"}

        async def models(via: Coordinator) -> httpx.Response:
            return await http.get(f"{via.gateway_url}/models", headers=auth)

        passed = [(await models(via)).status_code for via in (a, b, a)]
        refused = [await models(via) for via in (b, a)]
        assert passed == [200, 200, 200]
        assert [(r.status_code, r.json()["error"]["code"]) for r in refused] == [
            (429, "rate_limited")
        ] * 2
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        other, text = b.store.api_keys.create("other", 6000, time.time())
        other_auth = {"authorization": f"Bearer {text}"}
        first = await http.get(f"{b.gateway_url}/models", headers=other_auth)
        assert first.status_code == 200  # b has now seen (and, alone, would keep) the key
        a.store.api_keys.revoke(other.key_id, time.time())
        after = await http.get(f"{b.gateway_url}/models", headers=other_auth)
        assert (after.status_code, after.json()["error"]["code"]) == (401, "invalid_api_key")


async def test_requests_through_a_peer_go_on_one_kept_alive_stream(
    postgres_url: str, tmp_path: Path
) -> None:
    async with held_by_b(postgres_url, tmp_path, keep_alive=True) as world:
        client = _client(world.a, new_key(world.a))
        async with client:
            answers = [
                await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"hi {n}"}]
                )
                for n in range(3)
            ]
            kept = world.a.gateway.proxy.pool.idle(world.held.job_id)
            connections = world.server.connections
            # Its server closes the kept connection as the next request comes: that one
            # goes again on a new stream, to the same replica.
            world.server.mode = "drop_kept"
            again = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "again"}]
            )
    assert [a.choices[0].message.content for a in answers] == ["t0 t1 t2 t3 t4"] * 3
    # One connection to the service: one stream through b, kept between the requests.
    assert (connections, kept) == (1, 1)
    assert again.choices[0].message.content == "t0 t1 t2 t3 t4"
    assert world.server.connections == 2


async def test_a_source_sending_unknown_keys_is_refused_unread_once_past_its_budget(
    postgres_url: str, tmp_path: Path
) -> None:
    # On a shared store each unknown key is a lookup on the loop: one address guessing
    # keys is refused, unread, once past its budget; another address is served.
    async with (
        two_coordinators(postgres_url, tmp_path) as (a, _),
        httpx.AsyncClient(
            trust_env=False,
            timeout=10,
            transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2"),
        ) as guesser,
        httpx.AsyncClient(trust_env=False, timeout=10) as other,
    ):
        auth = {"authorization": f"Bearer {new_key(a)}"}
        url = f"{a.gateway_url}/models"
        # A minute's worth at once, and what refills meanwhile: then none.
        statuses = []
        for n in range(2 * UNKNOWN_KEYS_PER_MIN):
            junk = {"authorization": f"Bearer {_junk_key(n)}"}
            statuses.append((await guesser.get(url, headers=junk)).status_code)
            if statuses[-1] != 401:
                break
        assert statuses[:UNKNOWN_KEYS_PER_MIN] == [401] * UNKNOWN_KEYS_PER_MIN
        assert statuses[-1] == 429
        refused = await guesser.get(url, headers=auth)
        served = await other.get(url, headers=auth)
    assert (refused.status_code, refused.json()["error"]["code"]) == (429, "rate_limited")
    assert int(refused.headers["retry-after"]) >= 1
    assert served.status_code == 200


def _junk_key(n: int) -> str:
    """A text of a key's shape that no key has."""
    return "gpk-" + f"{n:043d}"


async def test_a_bulk_answer_through_a_peer_lets_its_stream_window_grow(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder relays its tunnel stream to the peer reading what it holds, as a gateway
    does: the stream's window grows (test_gateway_bulk.py), the answer comes whole."""
    target = Target()
    await target.start()
    size = 24 << 20
    try:
        async with (
            two_coordinators(postgres_url, tmp_path) as (a, b),
            replica(b, "svc-bulk", ("127.0.0.1", target.port), ["bulk"]) as held,
        ):
            await until(
                lambda: (
                    held.node_id in a.store.presence.peer_tunnels(a.coordinator_id, time.time())
                ),
                "b's tunnel, in the store",
            )
            grants = window_grants(held.tunnel, monkeypatch)
            answer, read, _ = await fetch_bulk(a.gateway_url, new_key(a), size)
    finally:
        await target.stop()
    assert (answer.status_code, read) == (200, size)
    assert_window_grew(grants, size)
