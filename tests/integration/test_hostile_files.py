"""Hostile trees and paths: a job's /output, a spec's paths, on the real engine and runtimes.

A job controls the shape of what it writes: directories thousands deep, paths past
PATH_MAX, symlinks, FIFOs, directories where files were promised. None of it may crash the
agent, outlive the job, or hide bytes from the output cap.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from support.engine import require_runtime
from support.hostile_files import as_nobody, nest
from support.runner import make_spec, run_job

from sandbox.container import LABEL_RUNNER
from sandbox.docker_api import DockerClient
from sandbox.fstree import remove_tree
from sandbox.runner import Runner, RunnerConfig

MiB = 1 << 20
RUNTIMES = ["runc", "runsc"]

# Two chains of 1500 directories, one moved to the bottom of the other: 3002 deep and
# 6000 bytes long, past PATH_MAX, which no single path given to the kernel may be.
NEST_PAST_PATH_MAX = """
cd /output
p=$(seq 1500 | sed 's/.*/d/' | tr '\\n' /)
mkdir -p a/$p b/$p && ln -s / b/$p/up && mv b a/$p && chmod 0 a/$p/b
"""

# 64 MiB written where only a path past PATH_MAX leads: a shell that went into a chain
# while it was short writes once the chain has been moved to the bottom of another.
HIDE_PAST_PATH_MAX = """
cd /output
p=$(seq 150 | sed 's/.*/dddddddddddddddddddd/' | tr '\\n' /)
mkdir -p a/$p b/$p
(cd b/$p && touch /output/ready && while [ ! -e /output/moved ]; do sleep 0.1; done
 head -c 67108864 /dev/zero > f && echo wrote) &
while [ ! -e ready ]; do sleep 0.1; done
mv b a/$p && touch moved
wait
sleep 300
"""


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path: Path) -> Iterator[None]:
    """Leave no tree past PATH_MAX behind, even when a test fails: pytest's own cleanup of
    old temporary directories recurses, and would trip on one in a later session."""
    yield
    remove_tree(tmp_path)


@pytest.fixture(params=RUNTIMES)
async def runner(
    request: pytest.FixtureRequest, docker_engine: str, test_image: str, tmp_path: Path
) -> AsyncIterator[Runner]:
    """A prepared runner, once per runtime, checked to leave no container or directory."""
    require_runtime(request.param)
    jobs_dir = tmp_path / "jobs"
    runner = Runner(
        DockerClient(docker_engine), RunnerConfig(jobs_dir=jobs_dir, runtime=request.param)
    )
    await runner.prepare()
    yield runner
    left = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={LABEL_RUNNER}={runner.instance}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert left == []
    assert list(jobs_dir.iterdir()) == []


# ------------------------------------------- 1. a tree too deep to remove the usual way


async def test_a_job_nesting_directories_past_path_max_is_cleaned_up_and_the_next_runs(
    runner: Runner, test_image: str
) -> None:
    spec = make_spec(test_image, NEST_PAST_PATH_MAX, outputs=["a"], timeout_s=120)
    # Job ids of these tests' own: containers are named after them, on a shared engine.
    _, result = await run_job(runner, spec, "hostile-nest")
    assert result.reason == "completed", result
    assert [o.status for o in result.outputs] == ["not_a_file"]
    # The fixture checks that the job's directory and container are gone; a job after it runs.
    _, after = await run_job(runner, make_spec(test_image, "echo ok"), "hostile-after")
    assert after.reason == "completed"


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_leftover_nested_past_path_max_is_reaped(
    runtime: str, docker_engine: str, tmp_path: Path
) -> None:
    require_runtime(runtime)
    jobs_dir = tmp_path / "jobs"
    (jobs_dir / "gone-1" / "output").mkdir(parents=True)
    (jobs_dir / "gone-1" / "runner").write_text("another-boot:1:1")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("host file")
    bottom = nest(jobs_dir / "gone-1" / "output", 3000, "d" * 20)
    try:
        os.symlink(outside, "up", dir_fd=bottom)
        os.chmod(".", 0, dir_fd=bottom)
    finally:
        os.close(bottom)
    config = RunnerConfig(jobs_dir=jobs_dir, runtime=runtime)
    await Runner(DockerClient(docker_engine), config).prepare()
    assert list(jobs_dir.iterdir()) == []
    assert (outside / "keep").read_text() == "host file"  # the symlink was not followed


def test_what_cannot_be_removed_is_logged_and_left_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stuck = tmp_path / "job" / "output" / "stuck"
    stuck.parent.mkdir(parents=True)
    stuck.write_text("immutable")
    os.close(nest(tmp_path / "job" / "output", 2000))
    subprocess.run(["chattr", "+i", str(stuck)], check=True)
    try:
        with caplog.at_level(logging.WARNING, logger="sandbox.fstree"):
            assert remove_tree(tmp_path / "job") is False
        assert "left for the next reap" in caplog.text
        assert not (tmp_path / "job" / "output" / "d").exists()  # the rest went
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    assert remove_tree(tmp_path / "job") is True
    assert not (tmp_path / "job").exists()


def test_removal_gives_back_rights_a_job_took_away_from_its_owner(tmp_path: Path) -> None:
    # The agent not root: the job ran as the agent's uid, and set modes on what it wrote.
    os.chown(tmp_path, 65534, 65534)

    def nest_lock_and_remove() -> bool:
        Path("job/output").mkdir(parents=True)
        bottom = nest(Path("job/output"), 1500)
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=bottom))
        os.chmod(".", 0, dir_fd=bottom)
        os.close(bottom)
        os.chmod("job/output/d", 0o500)
        return remove_tree(Path("job")) and not Path("job").exists()

    assert as_nobody(tmp_path, nest_lock_and_remove)


# ------------------------------------------------------- 2. spec paths deep and long


def _run_local(
    tmp_path: Path, spec: str, runtime: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "job.toml").write_text(spec)
    (tmp_path / "policy.toml").write_text(f'allowed_images = ["*"]\nruntime = "{runtime}"\n')
    env = {
        **os.environ,
        "HOME": str(tmp_path),  # jobs directories go under ~/.cache
        "GPU_AGENT_NVML_LIB": str(tmp_path / "absent" / "libnvidia-ml.so.1"),
        "GPU_AGENT_SYSFS_ROOT": str(tmp_path),
    }
    command = [sys.executable, "-m", "agent.cli", "run-local", str(tmp_path / "job.toml")]
    return subprocess.run(
        [*command, "--policy", str(tmp_path / "policy.toml"), *extra],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_run_local_refuses_an_input_path_1500_deep_with_exit_2(
    tmp_path: Path, test_image: str, runtime: str
) -> None:
    require_runtime(runtime)
    deep = "a/" * 1500 + "x"
    spec = f'image = "{test_image}"\n[[inputs]]\npath = "{deep}"\ncontent = "x"\n'
    result = _run_local(tmp_path, spec, runtime)
    assert result.returncode == 2
    assert "error [path_too_long]" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_run_local_survives_a_job_nesting_past_path_max_and_runs_again(
    tmp_path: Path, test_image: str, runtime: str
) -> None:
    require_runtime(runtime)
    script = json.dumps(NEST_PAST_PATH_MAX)
    spec = f'image = "{test_image}"\ncommand = ["sh", "-c", {script}]\noutputs = ["a"]\n'
    first = _run_local(tmp_path, spec, runtime)
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    jobs_dir = tmp_path / ".cache" / "gpu-agent" / "jobs"
    assert list(jobs_dir.iterdir()) == []
    again = _run_local(tmp_path, f'image = "{test_image}"\ncommand = ["true"]\n', runtime)
    assert again.returncode == 0, again.stderr


# ------------------------------------------- 3. bytes hidden from the output cap, odd outputs


async def test_bytes_written_past_path_max_count_against_the_output_cap(
    runner: Runner, test_image: str
) -> None:
    spec = make_spec(
        test_image, HIDE_PAST_PATH_MAX, outputs=["f"], output_max_bytes=4 * MiB, timeout_s=120
    )
    _, result = await run_job(runner, spec, "hostile-hide")
    assert (result.reason, result.error_code) == ("failed", "output_limit"), result


async def test_a_job_that_overflows_and_exits_before_the_watch_looks_is_caught(
    runner: Runner, test_image: str
) -> None:
    # 8 MiB against 4 MiB, written and gone well within one watch interval.
    script = "dd if=/dev/zero of=/output/f bs=1048576 count=8 2>/dev/null"
    spec = make_spec(test_image, script, outputs=["f"], output_max_bytes=4 * MiB)
    _, result = await run_job(runner, spec, "hostile-quick")
    assert (result.reason, result.error_code) == ("failed", "output_limit"), result
    assert result.outputs == []


async def test_an_output_that_is_a_directory_symlink_or_fifo_is_not_a_file(
    runner: Runner, test_image: str
) -> None:
    script = (
        "mkdir /output/result; mkfifo /output/pipe; ln -s /etc/passwd /output/link;"
        " echo hi > /output/ok.txt"
    )
    spec = make_spec(test_image, script, outputs=["result", "pipe", "link", "ok.txt"])
    _, result = await run_job(runner, spec, "hostile-odd")
    assert (result.reason, result.error_code) == ("completed", None), result
    status = {o.path: o.status for o in result.outputs}
    # gVisor keeps a FIFO inside the sandbox: the host never sees it.
    pipe = "missing" if runner.config.runtime == "runsc" else "not_a_file"
    assert status == {"result": "not_a_file", "pipe": pipe, "link": "not_a_file", "ok.txt": "ok"}
