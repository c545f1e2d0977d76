"""Replicas behind the real gateway: each a node with its own real tunnel, a service job the
store holds as ``ready`` (as the node's ``job_status`` makes it), and a server on loopback
that the node's ServiceTunnel carries the job's streams to."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from agent.link.identity import Identity
from agent.protocol import crypto
from agent.protocol.bodies import JobStatusBody
from agent.protocol.tunnel import STREAM_WINDOW
from agent.protocol.tunnel_frames import Window, decode_frames
from agent.services.tunnel import ServiceTunnel, tunnel_url
from coordinator.admission import Settings
from coordinator.gateway.client_conn import Limits
from coordinator.gateway.proxy import Timeouts
from coordinator.gateway.server import GatewaySettings
from coordinator.server import Coordinator
from support.tunnel_target import BULK_PATH

__all__ = [
    "IMAGE",
    "Replica",
    "assert_window_grew",
    "fetch_bulk",
    "new_key",
    "replica",
    "report",
    "service_spec",
    "streaming_request",
    "until",
    "window_grants",
]

IMAGE = "registry.example/llama-server@sha256:" + "ab" * 32


#: Short timeouts, records flushed at once: what the gateway's tests wait on.
SETTINGS = GatewaySettings(
    limits=Limits(head_timeout_s=1.0, body_timeout_s=2.0, write_timeout_s=2.0),
    timeouts=Timeouts(first_byte_s=10.0, idle_s=10.0, queue_s=0.3),
    record_flush_s=0.05,
)


def coordinator_with_gateway(tmp_path: Path) -> Coordinator:
    """A coordinator (not started) whose gateway has :data:`SETTINGS`."""
    return Coordinator(
        db_path=tmp_path / "coordinator.db",
        state_dir=tmp_path / "state",
        settings=Settings(handshake_timeout_s=5.0),
        gateway_settings=SETTINGS,
    )


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Wait for a condition nothing signals (a count in another component)."""
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def service_spec(models: list[str], *, max_streams: int = 64) -> dict[str, Any]:
    """A service job's spec serving ``models``."""
    return {
        "kind": "service",
        "image": IMAGE,
        "command": ["/llama-server"],
        "service": {"port": 8080, "models": models, "max_streams": max_streams},
    }


def report(coordinator: Coordinator, node_id: str, job_id: str, state: str) -> None:
    """Store a ``job_status`` of the node's, as its control connection does."""
    store = coordinator.store
    seq = (store.nodes.agent_seq(node_id) or 0) + 1
    body = JobStatusBody(job_id=job_id, state=state)
    store.add(node_id, seq, "job_status", msgspec.to_builtins(body), time.time(), job=body)


def new_key(coordinator: Coordinator, rate_per_min: int = 6000, name: str = "test") -> str:
    """A fresh API key's text."""
    return coordinator.store.api_keys.create(name, rate_per_min, time.time())[1]


class Replica(msgspec.Struct, kw_only=True):
    """A ready replica: its job, its node, the node's tunnel."""

    job_id: str
    node_id: str
    tunnel: ServiceTunnel


@asynccontextmanager
async def replica(
    coordinator: Coordinator,
    job_id: str,
    address: tuple[str, int],
    models: list[str],
    *,
    max_streams: int = 64,
) -> AsyncIterator[Replica]:
    """A node whose tunnel carries ``job_id``'s streams to ``address``, and the job ready."""
    identity = Identity.from_private_key(crypto.generate_private_key())
    coordinator.store.nodes.seen(identity.node_id, identity.public_key_b64, time.time())

    async def resolve(name: str) -> tuple[str, int] | None:
        return address if name == job_id else None

    tunnel = ServiceTunnel(
        url=tunnel_url(coordinator.url),
        identity=identity,
        pinned_keys={coordinator.key.key_id: coordinator.key.public_key},
        resolve=resolve,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )
    tunnel.start()
    try:
        # Both ends: the coordinator registers the link as it sends welcome, before the
        # node has read it and started serving (a test counting tasks needs them all).
        await until(
            lambda: (
                identity.node_id in coordinator.tunnels.connected() and tunnel.connected.is_set()
            ),
            "the tunnel",
        )
        spec = service_spec(models, max_streams=max_streams)
        await coordinator.submit(identity.node_id, spec, job_id=job_id)
        report(coordinator, identity.node_id, job_id, "ready")
        yield Replica(job_id=job_id, node_id=identity.node_id, tunnel=tunnel)
    finally:
        await tunnel.stop()


async def streaming_request(
    port: int, key: str, *, source: str = "127.0.0.1"
) -> asyncio.StreamWriter:
    """A streamed chat completion sent raw to the gateway on ``port`` (from the loopback
    address ``source``), read up to its first event; the connection's writer (closing it
    is the client going away)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    body = json.dumps({"model": "tiny", "stream": True, "messages": []}).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
        % (key.encode(), len(body), body)
    )
    head = await reader.readuntil(b"data: ")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return writer


async def fetch_bulk(gateway_url: str, key: str, size: int) -> tuple[httpx.Response, int, str]:
    """``size`` bytes of model ``bulk`` (support.tunnel_target's :data:`BULK_PATH`) through
    the gateway at ``gateway_url``, read to the end piece by piece: the answer's head, the
    bytes read and their SHA-256."""
    digest = hashlib.sha256()
    read = 0
    url = gateway_url.removesuffix("/v1") + BULK_PATH
    body = json.dumps({"model": "bulk", "bytes": size})
    headers = {"authorization": f"Bearer {key}"}
    async with (
        httpx.AsyncClient(trust_env=False, timeout=30) as client,
        client.stream("POST", url, content=body, headers=headers) as answer,
    ):
        async for piece in answer.aiter_raw():
            digest.update(piece)
            read += len(piece)
    return answer, read, digest.hexdigest()


def window_grants(tunnel: ServiceTunnel, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The increments of the streams' WINDOW frames the node receives from now on (its
    connection's own left out), in a list that fills as they come."""
    session = tunnel._session
    assert session is not None
    grants: list[int] = []
    receive = session.mux.receive_data

    def counting(message: bytes | str) -> list[object]:
        if isinstance(message, bytes):
            frames = decode_frames(message)
            grants.extend(f.increment for f in frames if isinstance(f, Window) and f.stream_id)
        return list(receive(message))

    monkeypatch.setattr(session.mux, "receive_data", counting)
    return grants


def assert_window_grew(grants: list[int], size: int) -> None:
    """A stream of ``size`` bytes was granted as a reader that keeps up is (docs/protocol.md,
    "Flow control"): larger grants than its first window, and few of them."""
    fixed = size // (STREAM_WINDOW // 2)  # a grant per 128 KiB read: 192 for 24 MiB
    assert max(grants) > STREAM_WINDOW
    assert len(grants) <= fixed // 8  # about one per half of the grown window, 4 MiB
