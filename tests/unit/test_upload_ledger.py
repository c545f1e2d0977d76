"""The ledger's schema step for uploads, and the job machine's uploading moves."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec
import pytest

from agent.errors import JobStateError
from agent.jobs import machine
from agent.jobs.ledger import Ledger
from agent.link import outbox as outbox_module
from agent.link.outbox import SCHEMA_VERSION, Outbox
from agent.protocol.jobs import OutputDigest, Receipt, UploadTarget

_RECEIPT = Receipt(
    job_id="j1",
    node_id="n1",
    state="completed",
    offer_sha256="0" * 64,
    spec_digest="sha256:x",
    outputs=[
        OutputDigest(path="a", status="ok", size_bytes=3, sha256="a" * 64),
        OutputDigest(path="b", status="missing"),
        OutputDigest(path="c", status="ok", size_bytes=5, sha256="c" * 64),
    ],
)
_TARGETS = {p: UploadTarget(url=f"https://s/{p}") for p in ("a", "b", "c")}


def test_a_ledger_of_the_previous_schema_migrates_and_keeps_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as db:  # the file of the agent before uploads (schema 3)
        before = outbox_module._MIGRATIONS[: SCHEMA_VERSION - 1]
        for version, statements in enumerate(before, start=1):
            for statement in statements:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version}")
        db.execute(
            "INSERT INTO jobs (job_id, state, offer, created, updated)"
            " VALUES ('old', 'running', x'7b7d', 1, 1)"
        )
    db.close()
    outbox = Outbox.open(path)
    try:
        ledger = Ledger(outbox)
        record = ledger.get("old")
        assert record is not None
        assert record.state == "running"
        assert ledger.held("old") is None  # running, not uploading
    finally:
        outbox.close()
    with sqlite3.connect(path) as probe:
        assert probe.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    probe.close()


def test_an_uploading_job_and_its_acknowledged_outputs_outlive_a_reopen(tmp_path: Path) -> None:
    outbox = Outbox.open(tmp_path / "outbox.db")
    ledger = Ledger(outbox)
    rows: list[machine.Row] = [machine.NewJob(job_id="j1", state="accepted", offer=b"{}")]
    outbox.append_many([], 1.0, also=ledger.write(rows, 1.0))
    decision = machine.upload(
        "j1", "running", _RECEIPT, detail="d", targets=_TARGETS, spool="/s/j1"
    )
    assert decision is not None
    outbox.append_many(decision.messages, 2.0, also=ledger.write(decision.rows, 2.0))
    done = machine.uploaded("j1", "a")
    outbox.append_many([], 3.0, also=ledger.write(done.rows, 3.0))
    outbox.close()

    outbox = Outbox.open(tmp_path / "outbox.db")
    try:
        held = Ledger(outbox).held("j1")
        assert held is not None
        uploading, acknowledged = held
        assert (uploading.spool, uploading.detail, acknowledged) == ("/s/j1", "d", frozenset({"a"}))
        resumed = machine.resume("j1", uploading, _TARGETS, acknowledged).upload
        assert resumed is not None
        assert [(i, p) for i, p, *_ in resumed.files] == [(2, "c")]  # a is done, b missing
        assert resumed.receipt == _RECEIPT
    finally:
        outbox.close()


def test_uploading_sits_between_running_and_every_end() -> None:
    assert "uploading" in machine.TRANSITIONS["running"]
    assert machine.TRANSITIONS["uploading"] == machine.TRANSITIONS["running"] - {"uploading"}
    for state in ("accepted", "pulling", "completed", "error"):
        assert "uploading" not in machine.TRANSITIONS[state]


def test_upload_holds_the_receipt_and_reports_uploading_only() -> None:
    decision = machine.upload("j1", "running", _RECEIPT, detail="", targets=_TARGETS, spool="/s/j1")
    assert decision is not None
    assert [kind for kind, _ in decision.messages] == ["job_status"]  # no job_result yet
    assert msgspec.json.decode(decision.messages[0][1])["state"] == "uploading"
    assert decision.upload is not None
    assert [f[:2] for f in decision.upload.files] == [(0, "a"), (2, "c")]


def test_nothing_to_upload_is_no_uploading_state() -> None:
    only_a = {"b": UploadTarget(url="https://s/b")}  # b is missing: nothing to deliver
    assert machine.upload("j1", "running", _RECEIPT, detail="", targets=only_a, spool="/s") is None


def test_a_finished_job_cannot_start_uploading() -> None:
    with pytest.raises(JobStateError) as caught:
        machine.upload("j1", "completed", _RECEIPT, detail="", targets=_TARGETS, spool="/s")
    assert caught.value.code == "bad_transition"


def test_the_end_of_an_upload_discards_its_spool_after_the_commit() -> None:
    decision = machine.finish(
        "j1",
        "uploading",
        "completed",
        code="",
        detail="",
        exit_code=0,
        envelope=b'{"payloadType":"t","payload":"","signatures":[{"sig":"AA=="}]}',
        digest="d",
        spool="/s/j1",
    )
    assert decision.discard == "/s/j1"
    assert [kind for kind, _ in decision.messages] == ["job_result", "job_status"]
