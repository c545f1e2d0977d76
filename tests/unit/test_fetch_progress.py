"""How far a job's URL inputs are fetched: the rows, their rate limit, the wire, the view."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import pytest

from agent.control.wire import JobView
from agent.errors import JobStateError
from agent.inputs.progress import FetchProgress
from agent.jobs import machine
from agent.protocol.bodies import JobStatusBody
from agent.protocol.limits import MAX_PROGRESS_PATH_CHARS

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _progress(
    clock: Clock, done: frozenset[str] = frozenset()
) -> tuple[FetchProgress, list[dict[str, tuple[int, int]]]]:
    reports: list[dict[str, tuple[int, int]]] = []

    def report(rows: Mapping[str, tuple[int, int]]) -> None:
        reports.append(dict(rows))

    sizes = {"a.bin": 4 * MIB, "b.bin": 2 * MIB}
    return FetchProgress(sizes, every_s=2.0, clock=clock, report=report, done=done), reports


def test_the_first_report_is_at_once_with_every_input() -> None:
    progress, reports = _progress(Clock())
    progress.start()
    assert reports == [{"a.bin": (0, 4 * MIB), "b.bin": (0, 2 * MIB)}]


def test_an_input_already_in_the_cache_is_whole_from_the_first_report() -> None:
    progress, reports = _progress(Clock(), done=frozenset({"b.bin"}))
    progress.start()
    assert reports == [{"a.bin": (0, 4 * MIB), "b.bin": (2 * MIB, 2 * MIB)}]
    assert progress.totals == (2 * MIB, 6 * MIB)


def test_updates_are_reported_no_more_often_than_the_interval() -> None:
    clock = Clock()
    progress, reports = _progress(clock)
    progress.start()
    progress.update("a.bin", 1 * MIB)
    clock.now += 1.9
    progress.update("a.bin", 2 * MIB)
    assert len(reports) == 1  # both within the interval: taken, not sent
    assert progress.totals == (2 * MIB, 6 * MIB)
    clock.now += 0.1
    progress.update("a.bin", 3 * MIB)
    assert reports[-1] == {"a.bin": (3 * MIB, 4 * MIB), "b.bin": (0, 2 * MIB)}
    clock.now += 1.0
    progress.update("b.bin", 1 * MIB)
    assert len(reports) == 2


def test_bytes_past_an_inputs_size_and_unknown_paths_are_not_counted() -> None:
    clock = Clock()
    progress, _ = _progress(clock)
    progress.update("a.bin", 9 * MIB)
    progress.update("elsewhere", 5)
    assert progress.rows == {"a.bin": (4 * MIB, 4 * MIB), "b.bin": (0, 2 * MIB)}


def test_the_first_fetching_report_moves_the_job_and_the_next_are_only_sent() -> None:
    rows = {"weights/model.bin": (MIB, 4 * MIB)}
    first = machine.fetching("j", "accepted", rows)
    assert first.rows == (machine.Transition(job_id="j", state="fetching"),)
    [(kind, body)] = first.messages
    decoded = msgspec.json.decode(body, type=JobStatusBody)
    assert (kind, decoded.state) == ("job_status", "fetching")
    assert msgspec.to_builtins(decoded.inputs) == [
        {"path": "weights/model.bin", "done": MIB, "total": 4 * MIB}
    ]
    assert decoded.progress is msgspec.UNSET
    later = machine.fetching("j", "fetching", rows)
    assert later.rows == ()
    assert len(later.messages) == 1


def test_a_long_path_is_cut_to_what_the_wire_carries() -> None:
    path = "d/" * 300 + "x.bin"
    decision = machine.fetching("j", "accepted", {path: (0, 1)})
    body = msgspec.json.decode(decision.messages[0][1], type=JobStatusBody)
    assert isinstance(body.inputs, list)
    assert body.inputs[0].path == path[:MAX_PROGRESS_PATH_CHARS]


def test_a_job_that_runs_cannot_go_back_to_fetching() -> None:
    with pytest.raises(JobStateError):
        machine.fetching("j", "running", {"a": (0, 1)})


@pytest.mark.parametrize(
    ("state", "fetched", "total", "shown"),
    [
        ("fetching", 30, 120, "fetching 25%"),
        ("fetching", 200, 120, "fetching 100%"),
        ("fetching", None, None, "fetching"),
        ("running", 30, 120, "running"),
    ],
)
def test_a_jobs_state_shows_its_fetch(
    state: str, fetched: int | None, total: int | None, shown: str
) -> None:
    view = JobView(
        job_id="j",
        state=state,
        created_at=0,
        updated_at=0,
        fetched_bytes=fetched,
        fetch_bytes=total,
    )
    assert view.shown_state == shown
