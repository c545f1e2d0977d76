"""Holes a hostile job opens in the engine around it, closed: each found on the real engine.

A job stopped for a limit is killed at once; image volumes are capped tmpfs, never host
disk; the job's output bypasses Docker's logging and costs the host a bounded amount;
each job has a uid of its own; a failed start under gVisor leaves no shim nor cgroup.
"""

from __future__ import annotations

import os
from contextlib import aclosing
from pathlib import Path

from test_runner import MiB, make_spec, runner  # noqa: F401  (the fixture, per runtime)

from sandbox.results import Exited, Finished, JobResult
from sandbox.runner import Runner


def _disk_bytes(path: Path) -> int:
    """Bytes the files under ``path`` take on disk."""
    return sum(
        (Path(root) / name).lstat().st_blocks * 512
        for root, _, files in os.walk(path)
        for name in files
    )


# ------------------------------------------- a job stopped for a limit gets no grace


async def test_job_over_its_output_limit_is_killed_without_its_grace(
    runner: Runner,  # noqa: F811
    test_image: str,
) -> None:
    # It ignores SIGTERM and writes 1 MiB every 0.1 s: given its grace of 10 s after the
    # overflow it would write ~100 MiB more; killed at once, a few MiB at most.
    script = (
        "trap '' TERM; i=0;"
        " while true; do head -c 1048576 /dev/zero > /output/f$i; i=$((i+1)); usleep 100000; done"
    )
    spec = make_spec(
        test_image, script, outputs=["f0"], output_max_bytes=4 * MiB, grace_s=10, timeout_s=60
    )
    written: int | None = None
    result: JobResult | None = None
    async with aclosing(runner.run("flood-1", spec, [])) as events:
        async for event in events:
            if isinstance(event, Exited):
                # The container is gone and its output directory not yet removed.
                written = _disk_bytes(runner.config.jobs_dir / "flood-1" / "output")
            elif isinstance(event, Finished):
                result = event.result
    assert result is not None
    assert (result.reason, result.error_code) == ("failed", "output_limit")
    assert written is not None
    # The limit, what the watch (every 0.5 s) lets through, and a wide margin for a slow host.
    assert written <= 4 * MiB + 40 * MiB
