"""Holes a hostile job opens in the engine around it, closed: each found on the real engine.

A job stopped for a limit is killed at once; image volumes are capped tmpfs, never host
disk; the job's output bypasses Docker's logging and costs the host a bounded amount;
each job has a uid of its own; a failed start under gVisor leaves no shim nor cgroup.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from contextlib import aclosing
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import require_runtime
from test_runner import MiB, make_spec, run_job, runner  # noqa: F401  (the fixture, per runtime)

from sandbox.container import volume_paths
from sandbox.errors import EngineError, RunError
from sandbox.events import Created, Event, Exited, Finished, JobResult, LogChunk
from sandbox.joblog import Drain
from sandbox.runner import Runner
from sandbox.spec import WorkloadSpec
from sandbox.uids import UidPool


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


# ------------------------------------- output read by attaching, at a bounded rate


async def test_output_is_attached_complete_and_in_order_with_no_log_driver(
    runner: Runner,  # noqa: F811
    test_image: str,
) -> None:
    # ~50 kB a stream: within the burst of the log rate and the drain, so nothing is dropped.
    script = "seq 1 10000; seq 10001 20000 >&2"
    events: list[Event] = []
    host_config: dict[str, Any] = {}
    async with aclosing(runner.run("attach-1", make_spec(test_image, script), [])) as stream:
        async for event in stream:
            events.append(event)
            if isinstance(event, Created):
                host_config = _inspect(event.container_id)["HostConfig"]
                with pytest.raises(EngineError):  # nothing is kept for the logs endpoint
                    await runner.engine.client.request(
                        "GET", f"/containers/{event.container_id}/logs", params={"stdout": 1}
                    )
    assert host_config["LogConfig"]["Type"] == "none"
    chunks = [e for e in events if isinstance(e, LogChunk)]
    out = b"".join(c.data for c in chunks if c.stream == "stdout")
    err = b"".join(c.data for c in chunks if c.stream == "stderr")
    assert out == "".join(f"{i}\n" for i in range(1, 10001)).encode()
    assert err == "".join(f"{i}\n" for i in range(10001, 20001)).encode()
    result = events[-1].result  # type: ignore[union-attr]
    assert (result.reason, result.log_dropped_bytes, result.log_truncated) == (
        "completed",
        0,
        False,
    )


async def test_output_flood_is_truncated_and_read_no_faster_than_the_drain(
    runner: Runner,  # noqa: F811
    test_image: str,
) -> None:
    rate, kept = 256 << 10, 64 << 10
    flooded = Runner(
        runner.engine.client,
        msgspec.structs.replace(runner.config, log_max_bytes=kept, log_drain_bytes_per_s=rate),
    )
    await flooded.prepare()
    spec = make_spec(test_image, "yes ''", timeout_s=3, grace_s=0, resources={"cpus": 0.2})
    clock = asyncio.get_running_loop().time
    began = clock()
    _, result = await run_job(flooded, spec, "flood-2")
    read_for = clock() - began
    assert result.reason == "timeout"
    assert (result.log_truncated, result.log_bytes) == (True, kept)
    # Read on past the cap (not left blocked), but at the drain rate and its burst at most,
    # with a frame of slack: a flood costs the host that much, however fast it writes.
    drained = result.log_bytes + result.log_dropped_bytes
    assert kept < drained <= rate * read_for + rate + (64 << 10)


def test_drain_paces_reading_to_its_rate_after_a_burst() -> None:
    now = [0.0]
    drain = Drain(rate=100, clock=lambda: now[0])
    assert drain.delay(100) == 0.0  # the burst
    assert drain.delay(50) == 0.5  # then half a second per 50 bytes
    now[0] = 0.5
    assert drain.delay(50) == 0.5
    now[0] = 100.0
    assert drain.delay(150) == 0.5  # a long pause refills one burst, no more


# ----------------------------------------------------------- a uid of each job's own

INOTIFY_IMAGE = "gpu-agent-test/inotify:1"


@pytest.fixture(scope="session")
def inotify_image(test_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The test image with ``inotify-hold`` (tests/inotify_hold.c, built static here)."""
    context = tmp_path_factory.mktemp("inotify")
    source = Path(__file__).with_name("inotify_hold.c")
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(context / "inotify-hold"), str(source)], check=True
    )
    (context / "Dockerfile").write_text(f"FROM {test_image}\nCOPY inotify-hold /bin/\n")
    subprocess.run(
        ["docker", "build", "-q", "-t", INOTIFY_IMAGE, str(context)],
        capture_output=True,
        check=True,
    )
    return INOTIFY_IMAGE


async def _while_running(
    jobs: Runner, job_id: str, spec: WorkloadSpec, lines: int, then: WorkloadSpec
) -> tuple[str, str]:
    """Run ``spec`` until it has printed ``lines`` lines, run ``then`` to its end meanwhile,
    cancel the first; both outputs."""
    first = b""
    second = b""
    async with aclosing(jobs.run(job_id, spec, [])) as stream:
        async for event in stream:
            if isinstance(event, LogChunk):
                first += event.data
                if first.count(b"\n") == lines:
                    events, _ = await run_job(jobs, then, f"{job_id}-next")
                    second = b"".join(e.data for e in events if isinstance(e, LogChunk))
                    assert jobs.cancel(job_id)
    return first.decode(), second.decode()


async def test_two_live_jobs_run_as_uids_and_gids_of_their_own(
    runner: Runner,  # noqa: F811
    test_image: str,
) -> None:
    ids = "echo $(id -u) $(id -g)"
    first, second = await _while_running(
        runner, "uid-1", make_spec(test_image, f"{ids}; sleep 30"), 1, make_spec(test_image, ids)
    )
    uid, gid = first.split()
    other_uid, other_gid = second.split()
    assert uid == gid
    assert other_uid == other_gid
    assert uid != other_uid
    assert "0" not in (uid, other_uid)


async def test_a_job_holding_every_inotify_instance_leaves_the_next_its_own(
    runner: Runner,  # noqa: F811
    inotify_image: str,
) -> None:
    # The kernel allows a uid max_user_instances (128) inotify instances: all jobs under one
    # uid, the first to take them all leaves the others none (EMFILE). Under gVisor inotify
    # is the sandbox's own, so there the hole may not exist; the job must still get its own.
    hog = make_spec(inotify_image, "inotify-hold 100000 hold")
    first, second = await _while_running(
        runner, "inotify-1", hog, 2, make_spec(inotify_image, "inotify-hold 1")
    )
    assert "refused EMFILE" in first  # it holds all it may
    assert second == "held 1\n"


# ------------------------------------- a failed start leaves no shim and no cgroup

BAD_SBIN_IMAGE = "gpu-agent-test/file-sbin:1"


@pytest.fixture(scope="session")
def bad_sbin_image(test_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The test image with a file at /sbin, where Docker mounts its init: no start there."""
    context = tmp_path_factory.mktemp("file-sbin")
    (context / "sbin").write_text("not a directory\n")
    (context / "Dockerfile").write_text(f"FROM {test_image}\nCOPY sbin /sbin\n")
    subprocess.run(
        ["docker", "build", "-q", "-t", BAD_SBIN_IMAGE, str(context)],
        capture_output=True,
        check=True,
    )
    return BAD_SBIN_IMAGE


def _shims(container_ids: list[str]) -> list[str]:
    """The command lines of containerd shims serving any of ``container_ids``: not those
    containerd runs for a moment to clean up after one (``... delete``)."""
    listed = subprocess.run(
        ["pgrep", "-af", "containerd-shim"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return [
        line
        for line in listed
        if any(f"-id {cid}" in line for cid in container_ids) and not line.endswith(" delete")
    ]


async def test_failed_starts_leave_no_shim_and_no_cgroup(
    runner: Runner,  # noqa: F811
    test_image: str,
    bad_sbin_image: str,
) -> None:
    # Under runsc a working directory it cannot enter fails the start after the create,
    # which is what left a shim per job; under runc (which enters /proc/1 fine) a /sbin that
    # is a file fails it. Both left the container's cgroup in the job's parent.
    if runner.config.runtime == "runsc":
        spec = make_spec(test_image, "true", workdir="/proc/1")
    else:
        spec = make_spec(bad_sbin_image, "true")
    container_ids = []
    for attempt in range(3):
        events, result = await run_job(runner, spec, f"nostart-{attempt}")
        assert result.error_code == "start_failed", result
        container_ids += [e.container_id for e in events if isinstance(e, Created)]
    assert len(container_ids) == 3
    assert _shims(container_ids) == []
    root = runner.config.cgroup_root
    assert (
        sorted(root.glob("*/gpu-agent/nostart-*")) + sorted(root.glob("gpu-agent/nostart-*")) == []
    )


def test_uid_pool_gives_each_live_job_its_own_and_says_when_none_is_free(
    tmp_path: Path,
) -> None:
    pool = UidPool(base=1000, count=2, lock_dir=tmp_path)
    assert (pool.take(), pool.take()) == (1000, 1001)
    with pytest.raises(RunError) as refused:
        pool.take()
    assert refused.value.code == "no_free_uid"
    pool.release(1000)
    assert pool.take() == 1000


def test_two_runners_on_one_host_never_hand_out_the_same_uid(tmp_path: Path) -> None:
    # The daemon and a run-local beside it: two pools, one host-wide lock directory.
    daemon, local = UidPool(1000, 3, tmp_path), UidPool(1000, 3, tmp_path)
    assert (daemon.take(), local.take(), daemon.take()) == (1000, 1001, 1002)
    with pytest.raises(RunError):
        local.take()
    local.release(1001)
    assert daemon.take() == 1001


def test_a_uid_held_by_a_process_that_died_is_free_again(tmp_path: Path) -> None:
    take = (
        "import pathlib, sys; from sandbox.uids import UidPool;"
        " print(UidPool(7, 1, pathlib.Path(sys.argv[1])).take())"
    )
    child = subprocess.run(
        [sys.executable, "-c", take, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert child.stdout.strip() == "7"  # and it exited holding it
    assert UidPool(7, 1, tmp_path).take() == 7


# A runner that is not root: the service runs as its own user, with the three file
# capabilities its unit grants (packaging/gpu-agent.service), or with none.
_AS_SERVICE = """
import asyncio, json, os, sys
from contextlib import aclosing
from pathlib import Path
from sandbox.docker_api import DockerClient
from sandbox.events import Finished, LogChunk
from sandbox.runner import Runner, RunnerConfig
from sandbox.spec import load_spec

async def main() -> None:
    jobs_dir, image, runtime = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    runner = Runner(DockerClient(sys.argv[4]), RunnerConfig(jobs_dir=jobs_dir, runtime=runtime))
    await runner.prepare()
    spec = load_spec(json.dumps({
        "image": image,
        "command": ["sh", "-c", "cat /input/in/data.txt > /output/seen; id -u;"
                    " mkdir /output/locked; echo x > /output/locked/f; chmod 0 /output/locked"],
        "inputs": [{"path": "in/data.txt", "content": "input for any uid"}],
        "outputs": ["seen"],
    }).encode(), "json")
    log = b""
    async with aclosing(runner.run("as-service", spec, [])) as events:
        async for event in events:
            if isinstance(event, LogChunk):
                log += event.data
            if isinstance(event, Finished):
                result = event.result
    print(json.dumps({"reason": result.reason, "error": result.error_code,
                      "uid": int(log), "me": os.getuid(),
                      "outputs": [o.status for o in result.outputs],
                      "left": sorted(p.name for p in jobs_dir.iterdir())}))

os.umask(0o027)  # the service's UMask=
asyncio.run(main())
"""


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
@pytest.mark.parametrize("caps", [True, False], ids=["file-caps", "no-caps"])
def test_a_service_with_the_file_capabilities_gives_each_job_its_own_uid(
    runtime: str, caps: bool, docker_engine: str, test_image: str
) -> None:
    require_runtime(runtime)
    # pytest's own temporary root is root's alone (0700): the service could not reach it.
    with tempfile.TemporaryDirectory(prefix="gpu-agent-service-") as top:
        Path(top).chmod(0o755)
        jobs_dir = Path(top) / "jobs"
        jobs_dir.mkdir()
        os.chown(jobs_dir, 65534, 65534)
        _run_as_service(runtime, caps, docker_engine, test_image, jobs_dir)


def _run_as_service(
    runtime: str, caps: bool, docker_engine: str, test_image: str, jobs_dir: Path
) -> None:
    docker_gid = os.stat(docker_engine.removeprefix("unix://")).st_gid
    granted = "+chown,+dac_override,+fowner" if caps else "-all"
    setpriv = ["setpriv", "--reuid=65534", "--regid=65534", f"--groups={docker_gid}"]
    setpriv += [f"--inh-caps={granted}"] + ([f"--ambient-caps={granted}"] if caps else [])
    script = [sys.executable, "-c", _AS_SERVICE, str(jobs_dir), test_image, runtime]
    ran = subprocess.run(
        [*setpriv, *script, docker_engine],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert ran.returncode == 0, ran.stderr
    outcome = json.loads(ran.stdout.splitlines()[-1])
    # The job read its input, whatever the service's umask; nothing of it is left.
    assert outcome["left"] == []
    if caps:
        # A uid of the job's own, not the service's: per-uid limits are its own; and what
        # it locked (chmod 0) is still measured, collected and removed.
        assert outcome["uid"] >= 200_000
        assert (outcome["reason"], outcome["error"], outcome["outputs"]) == (
            "completed",
            None,
            ["ok"],
        )
    else:
        # The service's own uid; a directory the job locked cannot be measured, which
        # counts as over the output limit.
        assert outcome["uid"] == outcome["me"] == 65534
        assert (outcome["reason"], outcome["error"]) == ("failed", "output_limit")
