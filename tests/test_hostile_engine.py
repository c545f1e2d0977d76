"""Holes a hostile job opens in the engine around it, closed: each found on the real engine.

A job stopped for a limit is killed at once; image volumes are capped tmpfs, never host
disk; the job's output bypasses Docker's logging and costs the host a bounded amount;
each job has a uid of its own; a failed start under gVisor leaves no shim nor cgroup.
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from test_runner import MiB, make_spec, runner  # noqa: F401  (the fixture, per runtime)

from sandbox.container import volume_paths
from sandbox.errors import RunError
from sandbox.results import Created, Event, Exited, Finished, JobResult, LogChunk
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


# ------------------------------------------------ image volumes: capped tmpfs, no host disk

VOLUME_IMAGE = "gpu-agent-test/volumes:1"
# As an image may spell them: Docker cleans "/odd/" and "//dbl" itself when it makes
# anonymous volumes, so a tmpfs keyed by the raw spelling would not cover them.
DECLARED = ("/input", "/output", "/data", "/odd/", "//dbl")


@pytest.fixture(scope="session")
def volume_image(test_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The test image declaring VOLUMEs, among them /input and /output."""
    context = tmp_path_factory.mktemp("volumes")
    (context / "Dockerfile").write_text(f"FROM {test_image}\nVOLUME {' '.join(DECLARED)}\n")
    subprocess.run(
        ["docker", "build", "-q", "-t", VOLUME_IMAGE, str(context)], capture_output=True, check=True
    )
    return VOLUME_IMAGE


def _inspect(container_id: str) -> dict[str, Any]:
    listed = subprocess.run(
        ["docker", "inspect", container_id], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, Any] = json.loads(listed)[0]
    return found


async def test_every_image_volume_is_a_capped_tmpfs_and_none_is_a_docker_volume(
    runner: Runner,  # noqa: F811
    volume_image: str,
) -> None:
    paths = ["/input", "/output", "/data", "/odd", "/dbl"]
    # A file past the 4 MiB cap in each: dd's own complaint is kept out of the log.
    script = "".join(
        f"echo {path} $(grep ' {path} ' /proc/mounts | cut -d' ' -f3);"
        f" dd if=/dev/zero of={path}/x bs=1M count=16 2>/dev/null || echo {path} full;"
        for path in paths
    )
    spec = make_spec(volume_image, script, resources={"scratch_bytes": 4 * MiB})
    mounts: list[dict[str, Any]] = []
    events: list[Event] = []
    async with aclosing(runner.run("volumes-1", spec, [])) as stream:
        async for event in stream:
            events.append(event)
            if isinstance(event, Created):
                mounts = _inspect(event.container_id)["Mounts"]
    assert [m for m in mounts if m["Type"] == "volume"] == []
    log = b"".join(e.data for e in events if isinstance(e, LogChunk)).decode().splitlines()
    for path in paths:
        assert f"{path} tmpfs" in log
        assert f"{path} full" in log


def test_image_volumes_are_matched_as_docker_cleans_them_and_odd_ones_refused() -> None:
    assert volume_paths(["/data/", "//dbl", "/a/../b", "/data"]) == ["/b", "/data", "/dbl"]
    for declared in ("relative", "/", "/proc/x", "//sys", "/dev/shm", "/../dev"):
        with pytest.raises(RunError) as refused:
            volume_paths([declared])
        assert refused.value.code == "bad_image_volume"
