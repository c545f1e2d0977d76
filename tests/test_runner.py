"""The runner on the real Docker engine: lifecycle, limits, cleanup, and hostile workloads."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import require_runtime

from sandbox.container import LABEL_MANAGED, LABEL_RUNNER
from sandbox.docker_api import DockerClient
from sandbox.errors import RunError
from sandbox.events import Created, Event, Exited, Finished, JobResult, LogChunk, Started
from sandbox.runner import LogBudget, Runner, RunnerConfig
from sandbox.spec import WorkloadSpec, load_spec

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


def _leftovers(jobs_dir: Path, label: str = LABEL_MANAGED) -> tuple[list[str], list[str]]:
    """Containers with ``label`` (any agent's, by default) and directories in ``jobs_dir``."""
    containers = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={label}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    dirs = sorted(p.name for p in jobs_dir.iterdir()) if jobs_dir.exists() else []
    return containers, dirs


@pytest.fixture(params=RUNTIMES)
async def runner(
    request: pytest.FixtureRequest, docker_engine: str, test_image: str, tmp_path: Path
) -> AsyncIterator[Runner]:
    """A prepared runner, once per runtime, whose jobs leave nothing behind."""
    require_runtime(request.param)
    jobs_dir = tmp_path / "jobs"
    config = RunnerConfig(jobs_dir=jobs_dir, runtime=request.param)
    runner = Runner(DockerClient(docker_engine), config)
    await runner.prepare()
    yield runner
    assert _leftovers(jobs_dir, f"{LABEL_RUNNER}={runner.instance}") == ([], [])


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


def _log(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, LogChunk))


async def test_trivial_job_completes_with_its_output_and_measurements(
    runner: Runner, test_image: str
) -> None:
    events, result = await run_job(runner, make_spec(test_image, "echo hello; echo oops >&2"))
    kinds = [type(e) for e in events]
    assert kinds[:2] == [Created, Started]
    assert kinds[-2:] == [Exited, Finished]
    assert result.reason == "completed"
    assert result.exit_code == 0
    log = _log(events)
    assert b"hello\n" in log
    assert b"oops\n" in log
    assert result.log_sha256 == hashlib.sha256(log).hexdigest()
    assert result.image_id is not None
    assert result.image_id.startswith("sha256:")
    assert result.cpu_seconds is not None
    assert result.peak_memory_bytes is not None
    assert result.peak_memory_bytes > 0
    assert result.started_at is not None
    assert result.finished_at is not None
    assert result.started_at <= result.finished_at


async def test_non_zero_exit_is_failed_with_its_code(runner: Runner, test_image: str) -> None:
    _, result = await run_job(runner, make_spec(test_image, "exit 3"))
    assert (result.reason, result.exit_code) == ("failed", 3)


async def test_job_past_its_timeout_is_stopped(runner: Runner, test_image: str) -> None:
    _, result = await run_job(runner, make_spec(test_image, "sleep 60", timeout_s=1))
    assert result.reason == "timeout"


async def test_cancel_stops_the_job_with_sigterm_first(runner: Runner, test_image: str) -> None:
    script = "trap 'echo got-term; exit 0' TERM; echo ready; while true; do sleep 0.1; done"
    events: list[Event] = []
    async with aclosing(runner.run("job-c", make_spec(test_image, script), [])) as stream:
        async for event in stream:
            events.append(event)
            if isinstance(event, LogChunk) and b"ready" in event.data:
                assert runner.cancel("job-c")
    result = events[-1].result  # type: ignore[union-attr]
    assert result.reason == "cancelled"
    assert b"got-term" in _log(events)


async def test_cancel_of_an_unknown_job_says_so(runner: Runner) -> None:
    assert runner.cancel("no-such-job") is False


async def test_bad_job_id_is_refused_before_anything_starts(
    runner: Runner, test_image: str
) -> None:
    with pytest.raises(RunError) as refused:
        await anext(runner.run("../etc", make_spec(test_image, "true"), []))
    assert refused.value.code == "bad_job_id"


async def test_missing_image_is_an_error_result(runner: Runner) -> None:
    spec = make_spec("sha256:" + "0" * 64, "true")
    _, result = await run_job(runner, spec)
    assert (result.reason, result.error_code) == ("error", "image_not_found")


async def test_inputs_are_readable_and_outputs_are_collected_with_digests(
    runner: Runner, test_image: str
) -> None:
    script = (
        "cat /input/data/greeting.txt > /output/copy.txt;"
        " ln -s /etc/passwd /output/sneaky;"
        # Sparse: /output's disk use stays within the cap, the file's size does not.
        " truncate -s 100000 /output/big.bin"
    )
    spec = make_spec(
        test_image,
        script,
        inputs=[{"path": "data/greeting.txt", "content": "hello from input\n"}],
        outputs=["copy.txt", "sneaky", "absent.txt", "big.bin"],
        output_max_bytes=64 * 1024,
    )
    _, result = await run_job(runner, spec)
    assert result.reason == "completed", result
    by_path = {o.path: o for o in result.outputs}
    assert by_path["copy.txt"].status == "ok"
    assert by_path["copy.txt"].sha256 == hashlib.sha256(b"hello from input\n").hexdigest()
    assert by_path["sneaky"].status == "not_a_file"
    assert by_path["absent.txt"].status == "missing"
    assert by_path["big.bin"].status == "too_large"


async def test_eight_jobs_run_at_once(runner: Runner, test_image: str) -> None:
    spec = make_spec(test_image, "echo done")
    results = await asyncio.gather(*(run_job(runner, spec, f"par-{i}") for i in range(8)))
    assert [r.reason for _, r in results] == ["completed"] * 8


async def test_orphans_of_a_killed_runner_are_reaped_on_restart(
    docker_engine: str, test_image: str, tmp_path: Path
) -> None:
    jobs_dir = tmp_path / "jobs"
    script = f"""
import asyncio, json, sys
sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parent.parent)]!r}
from test_runner import make_spec
from sandbox.docker_api import DockerClient
from sandbox.runner import LogBudget, Runner, RunnerConfig
from pathlib import Path

async def main():
    runner = Runner(DockerClient({docker_engine!r}), RunnerConfig(jobs_dir=Path({str(jobs_dir)!r})))
    await runner.prepare()
    spec = make_spec({test_image!r}, "echo started; sleep 300", outputs=["x"])
    async for event in runner.run("orphan-1", spec, []):
        if type(event).__name__ == "LogChunk":
            print("started", flush=True)

asyncio.run(main())
"""
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "started"
        os.kill(child.pid, signal.SIGKILL)
    left_containers, left_dirs = _leftovers(jobs_dir)
    assert len(left_containers) == 1
    assert left_dirs == ["orphan-1"]

    restarted = Runner(DockerClient(docker_engine), RunnerConfig(jobs_dir=jobs_dir))
    assert await restarted.prepare() == ["orphan-1"]
    assert _leftovers(jobs_dir) == ([], [])


# ----------------------------------------------------------------- hostile workloads


async def test_fork_bomb_is_contained(runner: Runner, test_image: str) -> None:
    host_pids = len(psutil.pids())
    script = "while true; do sleep 30 & done"
    spec = make_spec(test_image, script, resources={"pids": 16}, timeout_s=5)
    events, result = await run_job(runner, spec)
    assert result.reason in ("timeout", "failed")
    assert len(psutil.pids()) < host_pids + 50  # nothing of the bomb is left on the host
    if runner.config.runtime == "runc":
        assert b"can't fork" in _log(events)  # runc: the pids cgroup refused the forks


async def test_memory_bomb_is_oom_killed_and_reported(runner: Runner, test_image: str) -> None:
    # tail -c keeps the last N bytes in memory: 256 MiB against a 32 MiB limit.
    script = "head -c 268435456 /dev/zero | tail -c 268435456 > /dev/null"
    spec = make_spec(test_image, script, resources={"memory_bytes": 32 * MiB})
    _, result = await run_job(runner, spec)
    assert result.reason == "oom_killed"


async def test_disk_fill_is_held_by_the_scratch_size(runner: Runner, test_image: str) -> None:
    script = "dd if=/dev/zero of=/scratch/fill bs=1M count=100 2>&1"
    spec = make_spec(test_image, script, resources={"scratch_bytes": 8 * MiB})
    events, result = await run_job(runner, spec)
    log = _log(events)
    assert b"No space left on device" in log or b"File too large" in log
    assert result.reason == "failed"


async def test_root_filesystem_is_read_only(runner: Runner, test_image: str) -> None:
    script = "touch /evil /bin/evil 2>/dev/null || echo REFUSED; ls /evil /bin/evil 2>&1"
    events, _ = await run_job(runner, make_spec(test_image, script))
    log = _log(events).decode()
    assert "REFUSED" in log
    assert log.count("No such file or directory") == 2


async def _probe_bridge(runner: Runner, image: str, network: str) -> tuple[str, bool]:
    """Run a job that probes a listener on this machine's own Docker bridge (never an
    outside address); return its output and whether the listener saw a connection."""
    bridge = next(a.address for a in psutil.net_if_addrs()["docker0"] if a.family == 2)
    connected = asyncio.Event()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        writer.close()

    server = await asyncio.start_server(accept, bridge, 0)
    port = server.sockets[0].getsockname()[1]
    script = f"ip -o link | cut -d: -f2; nc -w 2 {bridge} {port} </dev/null && echo REACHED"
    async with server:
        events, _ = await run_job(runner, make_spec(image, script, network=network))
    return _log(events).decode(), connected.is_set()


async def test_network_has_only_loopback_and_reaches_nothing(
    runner: Runner, test_image: str
) -> None:
    log, connected = await _probe_bridge(runner, test_image, "none")
    assert [line.strip() for line in log.splitlines() if line.startswith(" ")] == ["lo"]
    assert "REACHED" not in log
    assert not connected


async def test_the_network_probe_does_reach_the_bridge_with_egress(
    runner: Runner, test_image: str
) -> None:
    if runner.config.runtime == "runsc":
        pytest.skip("this engine's runsc is registered with --network=none")
    log, connected = await _probe_bridge(runner, test_image, "egress")
    assert "REACHED" in log
    assert connected


async def test_job_has_no_capabilities_and_setuid_does_not_escalate(
    runner: Runner, test_image: str
) -> None:
    script = "grep CapEff /proc/self/status; id -u; /suid/busybox id -u"
    events, result = await run_job(runner, make_spec(test_image, script))
    log = _log(events).decode()
    assert "CapEff:\t0000000000000000" in log
    uid, setuid_uid = log.splitlines()[1:3]
    assert uid == setuid_uid != "0"
    assert result.reason == "completed"


async def test_host_files_and_devices_are_absent(runner: Runner, test_image: str) -> None:
    script = "ls /dev; ls /dev/dri /dev/kfd /etc/shadow 2>&1; cat /proc/1/comm"
    events, _ = await run_job(runner, make_spec(test_image, script))
    log = _log(events).decode()
    devices = set(log.split())
    assert not devices & {"sda", "vda", "kfd", "dri", "nvidia0", "nvidiactl", "mem", "kmsg"}
    assert log.count("No such file or directory") == 3
    assert "docker-init" in log  # PID 1 is the init Docker injected, not a host process


async def test_huge_log_output_is_capped(runner: Runner, test_image: str) -> None:
    script = "yes | head -c 5000000"
    events, result = await run_job(runner, make_spec(test_image, script))
    log = _log(events)
    assert result.log_bytes == len(log)
    assert 0 < result.log_bytes <= RunnerConfig(jobs_dir=Path()).log_max_bytes
    assert result.log_truncated or result.log_dropped_bytes > 0
    assert set(log) == {ord("y"), ord("\n")}
    assert result.reason == "completed"


def test_log_budget_caps_the_rate_then_the_size() -> None:
    now = [0.0]
    budget = LogBudget(max_bytes=1000, rate=100, clock=lambda: now[0])
    assert budget.admit(b"x" * 150) == b"x" * 100  # the first second's burst
    assert budget.dropped == 50
    now[0] = 0.5
    assert len(budget.admit(b"x" * 100)) == 50  # half a second refills half the rate
    now[0] = 100.0
    assert len(budget.admit(b"x" * 2000)) == 100  # a long pause refills one burst, no more
    roomy = LogBudget(max_bytes=1000, rate=1 << 20, clock=lambda: now[0])
    assert len(roomy.admit(b"x" * 5000)) == 1000
    assert roomy.full
    assert roomy.admit(b"more") == b""


async def test_leaked_gvisor_sandbox_is_reaped_and_others_are_not(
    docker_engine: str, test_image: str, tmp_path: Path
) -> None:
    require_runtime("runsc")
    live = subprocess.run(
        ["docker", "run", "-d", "--runtime", "runsc", test_image, "sleep", "60"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # A job of a runner that died, whose container Docker has forgotten but whose gVisor
    # sandbox lives on (a stand-in process with the sandbox's name and arguments).
    leaked_id = "f" * 64
    jobs_dir = tmp_path / "jobs"
    (jobs_dir / "gone-1").mkdir(parents=True)
    (jobs_dir / "gone-1" / "runner").write_text("another-boot:1:1")
    (jobs_dir / "gone-1" / "container").write_text(leaked_id)
    disguised = f"exec -a runsc-sandbox {sys.executable} -c 'import time; time.sleep(60)' "
    with subprocess.Popen(["bash", "-c", disguised + leaked_id]) as leaked:
        try:
            runner = Runner(DockerClient(docker_engine), RunnerConfig(jobs_dir=jobs_dir))
            await asyncio.sleep(0.2)  # let bash exec into the disguised sleep
            reaped = await runner.prepare()
            assert leaked.wait(timeout=10) == -signal.SIGKILL
            assert f"runsc:{leaked_id[:12]}" in reaped
            assert not any(item.startswith(f"runsc:{live[:12]}") for item in reaped)
            state = subprocess.run(
                ["docker", "inspect", "-f", "{{.State.Running}}", live],
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            assert state == "true"
            assert not (jobs_dir / "gone-1").exists()
        finally:
            subprocess.run(["docker", "rm", "-f", live], capture_output=True, check=True)


async def test_a_live_runners_jobs_are_not_reaped_by_another(
    runner: Runner, docker_engine: str, test_image: str, tmp_path: Path
) -> None:
    spec = make_spec(test_image, "echo ready; sleep 30", outputs=["x"])
    async with aclosing(runner.run("mine-1", spec, [])) as events:
        async for event in events:
            if isinstance(event, LogChunk):
                other = Runner(
                    DockerClient(docker_engine), RunnerConfig(jobs_dir=runner.config.jobs_dir)
                )
                assert await other.prepare() == []
                assert runner.cancel("mine-1")


async def test_output_directory_past_its_limit_stops_the_job(
    runner: Runner, test_image: str
) -> None:
    script = "i=0; while true; do head -c 1048576 /dev/zero > /output/f$i; i=$((i+1)); done"
    spec = make_spec(test_image, script, outputs=["f0"], output_max_bytes=4 * MiB)
    _, result = await run_job(runner, spec)
    assert (result.reason, result.error_code) == ("failed", "output_limit")


async def test_image_volumes_are_size_capped_tmpfs_not_host_disk(
    runner: Runner, docker_engine: str, test_image: str, tmp_path: Path
) -> None:
    context = tmp_path / "volume-image"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {test_image}\nVOLUME /data\n")
    subprocess.run(
        ["docker", "build", "-q", "-t", "gpu-agent-test/volume:1", str(context)],
        capture_output=True, check=True,
    )  # fmt: skip
    script = (
        # dd's error goes to stderr, which may reach the log before stdout: keep it out.
        "grep ' /data ' /proc/mounts | cut -d' ' -f3;"
        " dd if=/dev/zero of=/data/x bs=1M count=64 2>/dev/null"
    )
    spec = make_spec("gpu-agent-test/volume:1", script, resources={"scratch_bytes": 4 * MiB})
    events, result = await run_job(runner, spec)
    log = _log(events).decode()
    assert log.splitlines()[0] == "tmpfs"
    assert result.reason == "failed"  # dd ran out of the 4 MiB
