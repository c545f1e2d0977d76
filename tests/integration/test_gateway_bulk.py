"""Large answers through the real gateway: client -> gateway -> tunnel -> agent -> service,
every byte in its place (the bench's bulk leg, bench/tunnel.py, asks for them so)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from support.gateway import coordinator_with_gateway, new_key, replica
from support.tunnel_target import BULK_PATH, Target, pattern

from agent.protocol.tunnel import STREAM_WINDOW
from agent.protocol.tunnel_frames import Window, decode_frames
from coordinator.server import Coordinator

_MiB = 1 << 20


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    async with coordinator_with_gateway(tmp_path) as server:
        yield server


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    server = Target()
    await server.start()
    yield server
    await server.stop()


async def _fetch(url: str, key: str, size: int) -> tuple[httpx.Response, int, str]:
    """The answer's head, its length read and its digest, read to the end piece by piece."""
    digest = hashlib.sha256()
    read = 0
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


@pytest.mark.parametrize("size", [0, 1, 3 * _MiB + 12345, 24 * _MiB])
async def test_a_large_answer_passes_through_the_gateway_whole_and_in_order(
    coordinator: Coordinator, target: Target, size: int
) -> None:
    key = new_key(coordinator)
    async with replica(coordinator, "svc-bulk", ("127.0.0.1", target.port), ["bulk"]):
        url = coordinator.gateway_url.removesuffix("/v1") + BULK_PATH
        answer, read, digest = await _fetch(url, key, size)
        again = await _fetch(url, key, size)  # the next on the same replica: as whole
    assert answer.status_code == 200
    assert answer.headers["content-length"] == str(size)
    assert read == size
    assert digest == hashlib.sha256(pattern(size, seed=len(BULK_PATH))).hexdigest()
    assert again[1:] == (read, digest)


async def test_a_bulk_answer_through_the_gateway_lets_its_stream_window_grow(
    coordinator: Coordinator, target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway reads what the stream holds, not a piece of it: its reads leave nothing
    unread, so the tunnel sees a reader that keeps up and doubles the stream's window
    (docs/protocol.md, "Flow control") instead of granting 128 KiB at a time: a few
    WINDOW frames for the whole answer, and the node sends without waiting on each."""
    size = 24 * _MiB
    grants: list[int] = []
    async with replica(coordinator, "svc-bulk", ("127.0.0.1", target.port), ["bulk"]) as one:
        session = one.tunnel._session
        assert session is not None
        receive = session.mux.receive_data

        def counting(message: bytes | str) -> list[object]:
            if isinstance(message, bytes):
                frames = decode_frames(message)
                grants.extend(f.increment for f in frames if isinstance(f, Window) and f.stream_id)
            return list(receive(message))

        monkeypatch.setattr(session.mux, "receive_data", counting)
        url = coordinator.gateway_url.removesuffix("/v1") + BULK_PATH
        _, read, _ = await _fetch(url, new_key(coordinator), size)
    assert read == size
    fixed = size // (STREAM_WINDOW // 2)  # a grant per 128 KiB read: 192
    assert max(grants) > STREAM_WINDOW
    assert len(grants) <= fixed // 8  # about one per half of the grown window, 4 MiB
