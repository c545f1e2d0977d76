"""What an adversarial review found: each hole, pinned shut.

These tests need the real parts this process; the others are in
tests/unit/test_review_fixes.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from sandbox.container import LABEL_JOB, LABEL_MANAGED, LABEL_RUNNER
from sandbox.docker_api import DockerClient
from sandbox.jobdir import JobDir, runner_instance
from sandbox.runner import Runner, RunnerConfig


def _run_local(tmp_path: Path, spec: str) -> subprocess.CompletedProcess[str]:
    spec_file = tmp_path / "job.toml"
    spec_file.write_text(spec)
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "GPU_AGENT_NVML_LIB": str(tmp_path / "absent" / "libnvidia-ml.so.1"),
        "GPU_AGENT_SYSFS_ROOT": str(tmp_path),
    }
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "run-local", str(spec_file), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_run_local_refuses_a_vanishing_cpu_limit_with_exit_2(
    tmp_path: Path, test_image: str
) -> None:
    spec = f'image = "{test_image}"\ncommand = ["true"]\n[resources]\ncpus = 1e-10\n'
    result = _run_local(tmp_path, spec)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error [bad_value]" in result.stderr
    assert "resources.cpus" in result.stderr


_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy: the root itself under v2, each controller's under v1."""
    if (_CGROUP_ROOT / "cgroup.controllers").exists():
        return [_CGROUP_ROOT]
    return [h for h in _CGROUP_ROOT.iterdir() if (h / "cgroup.procs").exists()]


def _plant(key: str) -> list[Path]:
    planted = [h / "gpu-agent" / key for h in _hierarchies()]
    for path in planted:
        path.mkdir(parents=True, exist_ok=True)
    return planted


async def test_an_empty_job_cgroup_no_live_runner_holds_is_reaped(
    docker_engine: str, test_image: str, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("making a cgroup needs root")
    tag = uuid.uuid4().hex[:8]
    orphan, with_dir, with_container = (f"{name}-{tag}" for name in ("orphan", "dir", "ctr"))
    runner = Runner(DockerClient(docker_engine), RunnerConfig(jobs_dir=tmp_path / "jobs"))
    # A job of a live runner (this process) that has its directory, and one that has a
    # container: neither is an orphan, though neither runs yet.
    JobDir(tmp_path / "jobs", with_dir).create(runner_instance())
    labels = {LABEL_MANAGED: "1", LABEL_JOB: with_container, LABEL_RUNNER: runner_instance()}
    created = await runner.engine.client.request(
        "POST", "/containers/create", body={"Image": test_image, "Labels": labels}
    )
    container_id = created.json()["Id"]
    planted = {key: _plant(key) for key in (orphan, with_dir, with_container)}
    try:
        reaped = await runner.reap_orphans()
        assert f"cgroup:{orphan}" in reaped
        assert not any(path.exists() for path in planted[orphan])
        assert all(path.is_dir() for path in planted[with_dir] + planted[with_container])
    finally:
        await runner.engine.client.request(
            "DELETE", f"/containers/{container_id}", params={"force": 1}
        )
        for path in planted[with_dir] + planted[with_container]:
            path.rmdir()


@pytest.mark.parametrize("command", [["status"], ["jobs"], ["logs", "job-1"]])
def test_a_socket_path_too_long_for_a_unix_address_is_a_usage_error(
    tmp_path: Path, command: list[str]
) -> None:
    socket_path = "/tmp/" + "s" * 195
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", *command, "--socket", socket_path],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(tmp_path)},
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "too long for a unix socket" in result.stderr
    assert "None" not in result.stderr
