"""How far an image pull is, as the CLI, run-local and the tray show it."""

from __future__ import annotations

import io

import pytest

from agent.control.wire import JobView
from agent.jobs.run_local import PullProgress, line
from sandbox.events import Pulling


def _job(state: str, pulled: int | None, total: int | None) -> JobView:
    return JobView(
        job_id="j", state=state, created_at=0, updated_at=0, pulled_bytes=pulled, pull_bytes=total
    )


@pytest.mark.parametrize(
    ("state", "pulled", "total", "shown"),
    [
        ("pulling", 45, 100, "pulling 45%"),
        ("pulling", 500, 100, "pulling 100%"),  # a layer's total grew after its bytes
        ("pulling", None, None, "pulling"),
        ("pulling", 10, 0, "pulling"),  # no total announced yet
        ("running", 45, 100, "running"),
    ],
)
def test_a_jobs_state_shows_its_pull(
    state: str, pulled: int | None, total: int | None, shown: str
) -> None:
    assert _job(state, pulled, total).shown_state == shown


def test_the_line_says_mib_and_percent_and_never_over_all() -> None:
    mib = 1 << 20
    assert line(12 * mib, 64 * mib) == "12.0 of 64.0 MiB (18%)"
    assert line(70 * mib, 64 * mib) == "64.0 of 64.0 MiB (100%)"
    assert line(3 * mib, 0) == "3.0 MiB"


def test_the_progress_line_is_redrawn_in_place_and_ended_once() -> None:
    out = io.StringIO()
    progress = PullProgress(out)
    progress.update(Pulling("a", 1 << 20, 2 << 20))
    progress.update(Pulling("b", 0, 2 << 20))
    progress.done()
    progress.done()
    text = out.getvalue()
    assert text.count("\r") == 2
    assert text.endswith("1.0 of 4.0 MiB (25%)\x1b[K\n")
