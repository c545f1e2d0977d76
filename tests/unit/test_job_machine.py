"""The job state machine, pure: every event's decision as data, and the moves it refuses."""

from __future__ import annotations

import itertools
import time
from typing import Any

import msgspec
import pytest

from agent.errors import JobStateError
from agent.jobs import machine
from agent.jobs.machine import TRANSITIONS, Logs, NewJob, Receipted, Start, Transition
from agent.protocol.bodies import JobStatusBody
from agent.protocol.jobs import FINAL_STATES, Offer
from sandbox.spec import load_spec

SPEC = {"image": "busybox:1", "command": ["true"], "timeout_s": 60}
STATES = sorted({s for s in TRANSITIONS if s is not None} | FINAL_STATES)


def _offer(job_id: str = "job-1") -> Offer:
    now = time.time()
    return Offer(job_id=job_id, node_id="n" * 16, spec=SPEC, issued_at=now, expires_at=now + 60)


def _statuses(decision: machine.Decision) -> list[dict[str, Any]]:
    return [msgspec.json.decode(body) for kind, body in decision.messages if kind == "job_status"]


def test_an_accepted_offer_is_recorded_answered_and_then_started() -> None:
    offer = _offer()
    spec = load_spec(msgspec.json.encode(SPEC), "json")
    decision = machine.accept(offer, b"{}", spec, ["gpu-0"])
    assert decision.rows == (
        NewJob(job_id="job-1", state="accepted", offer=b"{}", gpus=("gpu-0",)),
    )
    assert [s["state"] for s in _statuses(decision)] == ["accepted"]
    assert decision.start == Start("job-1", offer, spec, ("gpu-0",))


@pytest.mark.parametrize("verified", [True, False])
def test_a_refusal_records_the_id_only_when_the_offer_verified(verified: bool) -> None:
    decision = machine.refuse("job-1", "bad_signature", "x" * 10_000, verified=verified)
    [status] = _statuses(decision)
    assert (status["state"], status["code"]) == ("refused", "bad_signature")
    assert len(status["detail"]) < 10_000  # bounded as the protocol bounds it
    assert decision.start is None
    assert [type(r) for r in decision.rows] == ([NewJob] if verified else [])


def test_a_known_id_gets_its_state_and_nothing_is_written_or_run() -> None:
    decision = machine.answer_known("job-1", "running")
    assert decision.rows == ()
    assert decision.start is None
    assert _statuses(decision) == [
        {"job_id": "job-1", "state": "running", "code": "duplicate_offer", "detail": "job id known"}
    ]


def test_the_end_writes_state_and_receipt_and_queues_both_messages() -> None:
    envelope = msgspec.json.encode(
        {"payloadType": "t", "payload": "cA==", "signatures": [{"keyid": "k", "sig": "cw=="}]}
    )
    decision = machine.finish(
        "job-1",
        "running",
        "failed",
        code="exit_code",
        detail="exit 3",
        exit_code=3,
        envelope=envelope,
        digest="d" * 64,
    )
    assert decision.rows == (
        Transition(job_id="job-1", state="failed", code="exit_code", detail="exit 3", exit_code=3),
        Receipted("job-1", envelope, "d" * 64),
    )
    assert [kind for kind, _ in decision.messages] == ["job_result", "job_status"]


def test_log_chunks_go_to_the_ledger_and_the_coordinator_alike() -> None:
    decision = machine.forward_logs("job-1", [("stdout", "a\n"), ("stderr", "b\n")])
    assert decision.rows == (Logs("job-1", (("stdout", "a\n"), ("stderr", "b\n"))),)
    bodies = [msgspec.json.decode(body) for _, body in decision.messages]
    assert [(b["stream"], b["data"]) for b in bodies] == [("stdout", "a\n"), ("stderr", "b\n")]


@pytest.mark.parametrize(("current", "state"), list(itertools.product(STATES, STATES)))
def test_a_job_moves_only_as_the_table_says(current: str, state: str) -> None:
    allowed = state in TRANSITIONS[current]
    if allowed:
        assert machine.advance("job-1", current, state).rows[0].state == state  # type: ignore[arg-type, union-attr]
        return
    with pytest.raises(JobStateError) as caught:
        machine.advance("job-1", current, state)  # type: ignore[arg-type]
    assert caught.value.code == "bad_transition"


def test_final_states_go_nowhere_and_every_state_is_reachable() -> None:
    assert all(TRANSITIONS[state] == frozenset() for state in FINAL_STATES)
    reachable = set().union(*TRANSITIONS.values())
    assert reachable == set(TRANSITIONS) - {None}


def test_the_first_pull_report_moves_the_job_and_the_next_only_report() -> None:
    first = machine.pulling("job-1", "accepted", {"l1": (5, 10)})
    assert first.rows == (Transition(job_id="job-1", state="pulling"),)
    [status] = _statuses(first)
    assert status["state"] == "pulling"
    assert status["progress"] == [{"layer": "l1", "done": 5, "total": 10}]
    later = machine.pulling("job-1", "pulling", {"l1": (10, 10), "l0": (1, 0)})
    assert later.rows == ()
    assert [p["layer"] for p in _statuses(later)[0]["progress"]] == ["l0", "l1"]
    with pytest.raises(JobStateError):
        machine.pulling("job-1", "running", {})


def test_a_pull_report_is_bounded_whatever_the_engine_says() -> None:
    layers = {f"layer{i:04d}": (-1, 2**70) for i in range(1000)}
    [status] = _statuses(machine.pulling("job-1", "accepted", layers))
    assert len(status["progress"]) == 256
    assert (status["progress"][0]["done"], status["progress"][0]["total"]) == (0, 2**63 - 1)
    # What the node sends, the coordinator's decoder takes.
    msgspec.json.decode(msgspec.json.encode(status), type=JobStatusBody)
