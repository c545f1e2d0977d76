"""Large answers through the real gateway: client -> gateway -> tunnel -> agent -> service,
every byte in its place (the bench's bulk leg, bench/tunnel.py, asks for them so)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.gateway import (
    assert_window_grew,
    coordinator_with_gateway,
    fetch_bulk,
    new_key,
    replica,
    window_grants,
)
from support.tunnel_target import BULK_PATH, Target, pattern
from support.tunnel_world import running_target

from coordinator.server import Coordinator

_MiB = 1 << 20


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    async with coordinator_with_gateway(tmp_path) as server:
        yield server


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    async with running_target() as server:
        yield server


@pytest.mark.parametrize("size", [0, 1, 3 * _MiB + 12345, 24 * _MiB])
async def test_a_large_answer_passes_through_the_gateway_whole_and_in_order(
    coordinator: Coordinator, target: Target, size: int
) -> None:
    key = new_key(coordinator)
    async with replica(coordinator, "svc-bulk", ("127.0.0.1", target.port), ["bulk"]):
        answer, read, digest = await fetch_bulk(coordinator.gateway_url, key, size)
        again = await fetch_bulk(coordinator.gateway_url, key, size)  # as whole
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
    async with replica(coordinator, "svc-bulk", ("127.0.0.1", target.port), ["bulk"]) as one:
        grants = window_grants(one.tunnel, monkeypatch)
        _, read, _ = await fetch_bulk(coordinator.gateway_url, new_key(coordinator), size)
    assert read == size
    assert_window_grew(grants, size)
