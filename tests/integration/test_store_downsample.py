"""Raw telemetry past its window becomes per-minute min/mean/max per GPU metric (on SQLite
and on PostgreSQL: ``store_target``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from msgspec import Raw
from support.factories import deflated_frame

from coordinator.db import DbTarget
from coordinator.db_open import open_database
from coordinator.downsample import downsample
from coordinator.store import Message, Store

NODE = "node-aa"


@pytest.fixture
def store(store_target: DbTarget) -> Iterator[Store]:
    store = Store(store_target)
    store.nodes.seen(NODE, "key", 0.0)
    yield store
    store.close()


def sample(t: float, power: float, util: float | None) -> dict[str, Any]:
    gpus: list[dict[str, Any]] = [
        {"id": "GPU-0", "state": "ok", "power_w": power, "throttle_reasons": ["idle"]},
        {"id": "GPU-1", "power_w": power * 2, "util_gpu_pct": {"status": "unsupported"}},
    ]
    if util is not None:
        gpus[0]["util_gpu_pct"] = util
    return {"taken_at": t, "host": {"load_1m": 9.0}, "gpus": gpus}


def minutes(target: DbTarget) -> dict[tuple[int, str, str], tuple[float, float, float, int]]:
    db = open_database(target)
    try:
        rows = db.execute(
            "SELECT minute, gpu, metric, min, mean, max, samples FROM telemetry_minutes"
        ).fetchall()
    finally:
        db.close()
    return {(m, g, k): (lo, mean, hi, n) for m, g, k, lo, mean, hi, n in rows}


def test_raw_rows_past_the_window_become_minutes_and_go(
    store_target: DbTarget, store: Store
) -> None:
    # Minute 600 (10:00-10:59 s past epoch minute 10) gets samples from two batches.
    store.add(NODE, 1, "telemetry", {"samples": [sample(600, 100, 10), sample(610, 200, 30)]}, 1000)
    store.add(NODE, 2, "telemetry", {"samples": [sample(650, 300, None), sample(660, 50, 5)]}, 1001)
    store.add(NODE, 3, "telemetry", {"samples": [sample(720, 80, 8)]}, 5000)  # in the window
    before = store.retention.stored_bytes(NODE)
    assert downsample(store_target, received_before=2000, aggregates_before=0) == 2
    got = minutes(store_target)
    assert got[(600, "GPU-0", "power_w")] == (100, 200, 300, 3)
    assert got[(600, "GPU-0", "util_gpu_pct")] == (10, 20, 30, 2)  # absent once: not a zero
    assert got[(600, "GPU-1", "power_w")] == (200, 400, 600, 3)
    assert got[(660, "GPU-0", "power_w")] == (50, 50, 50, 1)
    # Strings, lists, unsupported readings and host readings are no GPU metric.
    assert {metric for _, _, metric in got} == {"power_w", "util_gpu_pct"}
    assert {gpu for _, gpu, _ in got} == {"GPU-0", "GPU-1"}
    assert store.nodes.all_seqs(NODE) == [3]
    assert store.retention.stored_bytes(NODE) < before
    assert store.nodes.last_agent_seq(NODE) == 3  # welcome never goes back


def test_a_batch_stored_as_its_deflated_frame_folds_as_its_text_does(
    store_target: DbTarget, store: Store
) -> None:
    other = "node-bb"
    store.nodes.seen(other, "key", 0.0)
    batch = {"samples": [sample(600, 100, 10), sample(610, 200, 30)], "dropped": 0}
    frame = msgspec.json.encode({"v": 1, "type": "telemetry", "seq": 1, "body": batch})
    store.add(NODE, 1, "telemetry", batch, 1000)
    store.add(other, 1, "telemetry", batch, 1000, deflated=deflated_frame(frame))
    # A row whose bytes do not inflate (a damaged file) is folded as nothing, not fatal.
    shed = {"samples": [], "dropped": 1}
    store.add(other, 2, "telemetry", shed, 1000, deflated=b"\xff not deflate")
    assert downsample(store_target, received_before=2000, aggregates_before=0) == 3
    db = open_database(store_target)
    try:
        rows = db.execute(
            "SELECT node_id, minute, gpu, metric, min, mean, max, samples FROM telemetry_minutes"
        ).fetchall()
    finally:
        db.close()
    folded = {node: {tuple(r[1:]) for r in rows if r[0] == node} for node in (NODE, other)}
    assert folded[NODE]
    assert folded[other] == folded[NODE]
    assert store.nodes.all_seqs(other) == []
    assert store.retention.stored_bytes(other) == 0


def test_many_deflated_batches_of_one_node_fold_into_the_same_minutes(
    store_target: DbTarget, store: Store
) -> None:
    # More batches than PostgreSQL's fold inflates at once: its statements must add up.
    powers = [float(p) for p in range(1, 151)]
    for seq, power in enumerate(powers, 1):
        batch = {"samples": [sample(600 + seq * 0.1, power, None)], "dropped": 0}
        frame = msgspec.json.encode({"v": 1, "type": "telemetry", "seq": seq, "body": batch})
        store.add(NODE, seq, "telemetry", batch, 1000, deflated=deflated_frame(frame))
    assert downsample(store_target, received_before=2000, aggregates_before=0) == len(powers)
    low, mean, high, count = minutes(store_target)[(600, "GPU-0", "power_w")]
    assert (low, high, count) == (1, 150, 150)
    assert mean == pytest.approx(sum(powers) / len(powers))
    assert store.nodes.all_seqs(NODE) == []
    assert store.retention.stored_bytes(NODE) == 0


def test_a_minute_folded_over_two_passes_keeps_a_weighted_mean(
    store_target: DbTarget, store: Store
) -> None:
    store.add(NODE, 1, "telemetry", {"samples": [sample(600, 100, 1)]}, 1000)
    downsample(store_target, received_before=2000, aggregates_before=0)
    store.add(NODE, 2, "telemetry", {"samples": [sample(601, 400, 1), sample(602, 400, 1)]}, 3000)
    downsample(store_target, received_before=4000, aggregates_before=0)
    assert minutes(store_target)[(600, "GPU-0", "power_w")] == (100, 300, 400, 3)


def test_aggregates_past_the_keep_window_are_deleted(store_target: DbTarget, store: Store) -> None:
    store.add(NODE, 1, "telemetry", {"samples": [sample(600, 100, 1), sample(7200, 1, 1)]}, 1)
    downsample(store_target, received_before=10, aggregates_before=3600)
    assert {minute for minute, _, _ in minutes(store_target)} == {7200}


def test_a_malformed_stored_sample_is_skipped_not_fatal(
    store_target: DbTarget, store: Store
) -> None:
    odd = [{"taken_at": "x", "gpus": [{"id": "GPU-0", "p": 1}]}, {"gpus": 3}, sample(600, 5, 5)]
    store.add(NODE, 1, "telemetry", {"samples": odd, "dropped": 0}, 1)
    store.add(NODE, 2, "telemetry", {"samples": [], "dropped": 1}, 1)  # a shed batch
    assert downsample(store_target, received_before=10, aggregates_before=0) == 2
    assert minutes(store_target)[(600, "GPU-0", "power_w")] == (5, 5, 5, 1)


def test_an_escaped_nul_or_a_reading_no_double_holds_does_not_stop_the_fold(
    store_target: DbTarget, store: Store
) -> None:
    # Both pass the protocol's checks (msgspec keeps telemetry as the bytes received);
    # PostgreSQL's jsonb refuses the one and a float8 cannot hold the other.
    odd = {"taken_at": 600, "note": "a\u0000b", "gpus": [{"id": "GPU-0", "huge": Raw(b"1e400")}]}
    store.add(NODE, 1, "telemetry", {"samples": [odd, sample(600, 7, 7)]}, 1)
    assert downsample(store_target, received_before=10, aggregates_before=0) == 1
    assert minutes(store_target)[(600, "GPU-0", "power_w")] == (7, 7, 7, 1)
    assert store.nodes.all_seqs(NODE) == []


def _read_bytes() -> int:
    """Bytes this thread has read from files so far (what SQLite's page reads cost)."""
    fields = dict(
        line.split(": ") for line in Path("/proc/thread-self/io").read_text().split("\n") if line
    )
    return int(fields["rchar"])


def test_a_pass_over_telemetry_within_its_window_reads_none_of_it(tmp_path: Path) -> None:
    # SQLite's: its reads are this thread's (PostgreSQL's, the server's).
    store = Store(tmp_path / "c.db")
    try:
        store.nodes.seen(NODE, "key", 0.0)
        # 200 batches of ~56 KB (11 MB), all received after the pass's window: nothing to do.
        batch = {"samples": [sample(600, 100, 10) | {"pad": "x" * 56_000}]}
        calls = [
            lambda s, q=q: s.add_in_transaction(Message(NODE, q, "telemetry", batch, 5000))
            for q in range(1, 201)
        ]
        assert store.run_group(calls) == ["stored"] * 200
        stored = store.retention.stored_bytes(NODE)
        start = _read_bytes()
        assert downsample(tmp_path / "c.db", received_before=2000, aggregates_before=0) == 0
        assert store.retention.prune_telemetry(received_before=2000, keep_rows=1000) == 0
        # Found from an index: at 10,000 agents the rows are the whole store, read at each
        # pass.
        assert _read_bytes() - start < stored // 10
    finally:
        store.close()


def test_a_node_whose_rows_the_database_cannot_fold_holds_back_no_other(
    store_target: DbTarget, store: Store
) -> None:
    # The fixture's node comes first; its one raw row is text no JSON reader takes.
    db = open_database(store_target)
    try:
        db.execute(
            "INSERT INTO messages (node_id, seq, type, body, received)"
            " VALUES (?, 1, 'telemetry', 'not json', 1000)",
            (NODE,),
        )
    finally:
        db.close()
    others = [f"node-{n}" for n in ("bb", "cc")]
    for node in others:
        store.nodes.seen(node, "key", 0.0)
        store.add(node, 1, "telemetry", {"samples": [sample(600, 100, 10)]}, 1000)
    assert downsample(store_target, received_before=2000, aggregates_before=0) == 2
    assert [store.nodes.all_seqs(node) for node in others] == [[], []]
    assert store.nodes.all_seqs(NODE) == [1]  # kept raw, for retention
    db = open_database(store_target)
    try:
        folded = db.execute("SELECT DISTINCT node_id FROM telemetry_minutes").fetchall()
    finally:
        db.close()
    assert sorted(node for (node,) in folded) == others
