"""What an adversarial review found: each hole, pinned shut."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sandbox.container import create_body
from sandbox.errors import SpecError
from sandbox.gpu_mapping import ContainerGpus
from sandbox.jobdir import JobMounts
from sandbox.spec import Resources, WorkloadSpec, load_spec


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


def _body(spec: WorkloadSpec) -> dict[str, Any]:
    return create_body(
        job_id="j",
        spec=spec,
        image_id="sha256:" + "0" * 64,
        gpus=ContainerGpus(),
        mounts=JobMounts(),
        user="1000:1000",
        runtime="runc",
        cgroup_parent=None,
        runner="r",
        image_volumes=[],
    )


# ------------------------------------------------------------------ 1. the CPU cap


@pytest.mark.parametrize("cpus", ["1e-10", "1e-9", "0.005", "0.00999", "0", "nan", "inf", "-inf"])
def test_a_cpu_limit_under_dockers_minimum_or_not_finite_is_refused(cpus: str) -> None:
    with pytest.raises(SpecError) as refused:
        load_spec(f'image = "x"\n[resources]\ncpus = {cpus}\n'.encode(), "toml")
    assert (refused.value.code, refused.value.field) == ("bad_value", "resources.cpus")


def test_dockers_minimum_cpu_limit_is_accepted_and_capped() -> None:
    spec = load_spec(b'image = "x"\n[resources]\ncpus = 0.01\n', "toml")
    assert _body(spec)["HostConfig"]["NanoCpus"] == 10_000_000


@pytest.mark.parametrize("cpus", [1e-10, 0.0, float("nan"), float("inf"), -1.0])
def test_the_container_body_never_asks_for_no_cpu_limit(cpus: float) -> None:
    # A spec built in code skips load_spec's checks: the body builder refuses it itself.
    spec = WorkloadSpec(image="x", resources=Resources(cpus=cpus))
    with pytest.raises(SpecError) as refused:
        _body(spec)
    assert refused.value.field == "resources.cpus"


def test_run_local_refuses_a_vanishing_cpu_limit_with_exit_2(
    tmp_path: Path, test_image: str
) -> None:
    spec = f'image = "{test_image}"\ncommand = ["true"]\n[resources]\ncpus = 1e-10\n'
    result = _run_local(tmp_path, spec)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error [bad_value]" in result.stderr
    assert "resources.cpus" in result.stderr
