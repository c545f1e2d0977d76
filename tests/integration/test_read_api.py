"""The read API (no token, on the agents' port) against what hostile agents store: its
answers stay readable and bounded whatever one node sent."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from msgspec import Raw
from support.admission import answers_until_ack, started, welcomed
from support.nodes import Node

from agent.protocol.messages import TelemetryBody, encode_frame, wrap
from coordinator.api import MAX_TELEMETRY_ANSWER

# A reading no double holds: msgspec keeps a sample's values as the bytes received
# (msgspec.Raw), so the protocol lets it through and the store keeps it as it came.
_HUGE = b'[{"id": "GPU-0", "power_w": 1e400}, {"id": "GPU-0", "power_w": -1e400}]'


def _telemetry(seq: int, *samples: dict[str, Raw]) -> str:
    return encode_frame(wrap(TelemetryBody(samples=list(samples)), seq))


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


async def test_a_node_whose_telemetry_holds_1e400_leaves_the_node_list_readable(
    tmp_path: Path,
) -> None:
    honest, hostile = Node(), Node()
    async with started(tmp_path) as coordinator:
        async with welcomed(coordinator, honest):
            pass
        async with welcomed(coordinator, hostile) as (ws, _):
            await ws.send(_telemetry(1, {"taken_at": Raw(b"600"), "gpus": Raw(_HUGE)}))
            await answers_until_ack(ws, 1)
        base = f"http://127.0.0.1:{coordinator.port}/api/nodes"
        status, nodes = await asyncio.to_thread(_get, base)
        assert status == 200, nodes
        assert {n["node_id"] for n in nodes["nodes"]} == {honest.node_id, hostile.node_id}
        status, telemetry = await asyncio.to_thread(_get, f"{base}/{hostile.node_id}/telemetry")
    assert status == 200, telemetry
    # Out of a double's range both ways: null, as JSON has no infinity.
    [item] = telemetry["items"]
    assert item["samples"][0]["gpus"] == [
        {"id": "GPU-0", "power_w": None},
        {"id": "GPU-0", "power_w": None},
    ]


async def test_a_telemetry_answer_holds_a_bounded_json_and_the_next_page_goes_on(
    tmp_path: Path,
) -> None:
    # A sample of a million zeros is a full frame that deflates to about 1 KB: what the
    # quota counts is no bound on what one answer would inflate.
    node = Node()
    zeros = {"taken_at": Raw(b"600"), "pad": Raw(b'"' + b"0" * 1_000_000 + b'"')}
    async with started(tmp_path) as coordinator:
        async with welcomed(coordinator, node) as (ws, _):
            for seq in range(1, 11):
                await ws.send(_telemetry(seq, zeros))
            await answers_until_ack(ws, 10)
        base = f"http://127.0.0.1:{coordinator.port}/api/nodes/{node.node_id}/telemetry"
        seqs: list[int] = []
        pages = 0
        while len(seqs) < 10:
            since = seqs[-1] if seqs else 0
            status, answer = await asyncio.to_thread(_get, f"{base}?limit=1000&since_seq={since}")
            assert status == 200
            page = [item["seq"] for item in answer["items"]]
            assert page, "a page holds at least one batch"
            assert len(page) * 1_000_000 <= MAX_TELEMETRY_ANSWER
            seqs += page
            pages += 1
    assert seqs == list(range(1, 11))
    assert pages >= 10 * 1_000_000 // MAX_TELEMETRY_ANSWER


async def test_the_node_list_comes_in_pages_of_summaries_with_one_sample_each(
    tmp_path: Path,
) -> None:
    nodes = [Node() for _ in range(3)]
    samples = [{"taken_at": Raw(b"%d" % t), "gpus": Raw(b"[]")} for t in (600, 601, 602)]
    async with started(tmp_path) as coordinator:
        for node in nodes:
            async with welcomed(coordinator, node) as (ws, _):
                await ws.send(_telemetry(1, *samples))
                await answers_until_ack(ws, 1)
        base = f"http://127.0.0.1:{coordinator.port}/api/nodes"
        _, first = await asyncio.to_thread(_get, base + "?limit=2")
        _, rest = await asyncio.to_thread(_get, base + "?limit=2&offset=2")
        bad = [
            await asyncio.to_thread(_get, base + q) for q in ("?limit=0", "?offset=-1", "?limit=x")
        ]
    assert (first["total"], len(first["nodes"]), len(rest["nodes"])) == (3, 2, 1)
    listed = [n["node_id"] for n in first["nodes"] + rest["nodes"]]
    assert sorted(listed) == sorted(n.node_id for n in nodes)
    # The newest batch's last sample, not the whole batch (~56 KB from a daemon).
    assert first["nodes"][0]["latest_telemetry"] == {
        "seq": 1,
        "samples": [{"taken_at": 602, "gpus": []}],
        "dropped": 0,
    }
    assert [status for status, _ in bad] == [400, 400, 400]


async def test_a_since_seq_past_what_sqlite_holds_is_refused_400(tmp_path: Path) -> None:
    node = Node()
    async with started(tmp_path) as coordinator:
        async with welcomed(coordinator, node):
            pass
        base = f"http://127.0.0.1:{coordinator.port}/api/nodes/{node.node_id}/telemetry"
        status, _ = await asyncio.to_thread(_get, base + "?since_seq=" + "9" * 30)
    assert status == 400
