"""The job machine's ``fetching`` state: between accepted and the image or the container."""

from __future__ import annotations

import msgspec
import pytest

from agent.errors import JobStateError
from agent.jobs import machine
from agent.jobs.machine import Transition


def test_an_accepted_job_moves_to_fetching_recorded_and_reported() -> None:
    decision = machine.advance("job-1", "accepted", "fetching")
    assert decision.rows == (Transition(job_id="job-1", state="fetching"),)
    [(kind, body)] = decision.messages
    assert kind == "job_status"
    assert msgspec.json.decode(body)["state"] == "fetching"


@pytest.mark.parametrize("state", ["pulling", "running", "error", "cancelled", "interrupted"])
def test_a_fetching_job_goes_on_to_its_image_its_container_or_an_end(state: str) -> None:
    assert state in machine.TRANSITIONS["fetching"]


@pytest.mark.parametrize(
    ("current", "state"),
    [
        ("running", "fetching"),
        ("pulling", "fetching"),
        ("fetching", "completed"),
        ("error", "fetching"),
    ],
)
def test_fetching_comes_only_before_the_image_and_the_container(current: str, state: str) -> None:
    with pytest.raises(JobStateError):
        machine.advance("job-1", current, state)  # type: ignore[arg-type]
