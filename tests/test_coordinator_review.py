"""The reference coordinator against the findings of an adversarial review: storage that
grows without bound, settings and files read without limit, a client that waits for ever,
and a CLI that dies on a closed pipe. Real coordinator on 127.0.0.1:0, real SQLite.
"""

from __future__ import annotations

from pathlib import Path

from test_coordinator_admission import (
    Node,
    answers_until_ack,
    codes,
    recv,
    started,
    telemetry,
    welcomed,
)

from agent.protocol.messages import JobStatusBody, encode_frame, wrap

_MIB = 1024 * 1024

# ------------------------------------------------------------------ 1. storage bounded


async def test_nodes_that_never_attest_keep_only_the_small_quota_each(tmp_path: Path) -> None:
    small = 2 * _MIB
    nodes = [Node() for _ in range(3)]
    async with started(tmp_path, unverified_quota_bytes=small) as coordinator:
        for node in nodes:
            async with welcomed(coordinator, node) as (ws, _):
                for seq in range(1, 11):
                    await ws.send(telemetry(seq, 1000 * 1000))
                await answers_until_ack(ws, 10)
        store = coordinator.store
        for node in nodes:
            assert store.stored_bytes(node.node_id) <= small
            assert store.last_agent_seq(node.node_id) == 10


async def test_the_store_cap_holds_over_all_nodes_and_job_status_is_never_shed(
    tmp_path: Path,
) -> None:
    cap = 3 * _MIB
    first, second, third = Node(), Node(), Node()
    async with started(
        tmp_path, unverified_quota_bytes=64 * _MIB, store_max_bytes=cap
    ) as coordinator:
        store = coordinator.store

        def total() -> int:
            return sum(store.stored_bytes(n.node_id) for n in (first, second, third))

        async with welcomed(coordinator, first) as (ws, _):
            for seq in range(1, 6):
                await ws.send(telemetry(seq, 1000 * 1000))
            assert codes(await answers_until_ack(ws, 5)) == []  # its own oldest make room
        assert total() <= cap
        async with welcomed(coordinator, second) as (ws, _):
            await ws.send(telemetry(1, 1000 * 1000))
            seen = await answers_until_ack(ws, 1)
            seen.append(await recv(ws))
            assert "quota_exceeded" in codes(seen)
            assert total() <= cap
            status = JobStatusBody(job_id="job-1", state="refused", code="busy")
            await ws.send(encode_frame(wrap(status, 2)))
            assert codes(await answers_until_ack(ws, 2)) == []
        assert store.messages(second.node_id, "job_status")[0].body["code"] == "busy"
        async with welcomed(coordinator, third) as (ws, _):
            for seq in range(1, 4):
                await ws.send(telemetry(seq, 1000 * 1000))
            await answers_until_ack(ws, 3)
        assert store.stored_bytes(third.node_id) < 1000
