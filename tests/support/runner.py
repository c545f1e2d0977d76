"""Specs and job runs for the runner's tests on the real Docker engine."""

from __future__ import annotations

import json
import subprocess
from contextlib import aclosing
from pathlib import Path
from typing import Any

from sandbox.container import LABEL_MANAGED
from sandbox.events import Event, Finished, JobResult
from sandbox.runner import Runner
from sandbox.spec import WorkloadSpec, load_spec

__all__ = ["RUNTIMES", "MiB", "leftovers", "make_spec", "run_job"]

MiB = 1 << 20


RUNTIMES = ["runc", "runsc"]


def make_spec(image: str, script: str, **overrides: Any) -> WorkloadSpec:
    """A spec running ``sh -c script``, decoded through the real spec decoder."""
    fields: dict[str, Any] = {
        "image": image,
        "command": ["sh", "-c", script],
        "timeout_s": 30,
        "grace_s": 1,
        "resources": {"memory_bytes": 64 * MiB, "pids": 64, "scratch_bytes": 16 * MiB},
    }
    fields.update(overrides)
    return load_spec(json.dumps(fields).encode(), "json")


def leftovers(jobs_dir: Path, label: str = LABEL_MANAGED) -> tuple[list[str], list[str]]:
    """Containers with ``label`` (any agent's, by default) and directories in ``jobs_dir``."""
    containers = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={label}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    dirs = sorted(p.name for p in jobs_dir.iterdir()) if jobs_dir.exists() else []
    return containers, dirs


async def run_job(
    runner: Runner, spec: WorkloadSpec, job_id: str = "job-1"
) -> tuple[list[Event], JobResult]:
    events: list[Event] = []
    async with aclosing(runner.run(job_id, spec, [])) as stream:
        async for event in stream:
            events.append(event)
    last = events[-1]
    assert isinstance(last, Finished)
    return events, last.result
