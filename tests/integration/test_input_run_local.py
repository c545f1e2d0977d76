"""``gpu-agent run-local`` fetches a spec's inputs by URL before the job, into its cache."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from support.input_server import serve_input

DATA = os.urandom(200_000)
SHA = hashlib.sha256(DATA).hexdigest()


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
        [sys.executable, "-m", "agent.cli", "run-local", str(spec_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _spec(image: str, url: str) -> str:
    return (
        f'image = "{image}"\ncommand = ["sha256sum", "/input/w/model.bin"]\ntimeout_s = 30\n'
        f'[[inputs]]\npath = "w/model.bin"\nurl = "{url}"\nsha256 = "{SHA}"\n'
        f"size_bytes = {len(DATA)}\n"
    )


def test_run_local_fetches_an_input_once_and_the_job_reads_it(
    tmp_path: Path, test_image: str
) -> None:
    with serve_input(DATA) as server:
        for _ in range(2):
            result = _run_local(tmp_path, _spec(test_image, server.url("/file")))
            assert result.returncode == 0, result.stderr
            assert f"{SHA}  /input/w/model.bin" in result.stdout
    assert server.hits["/file"] == 1
    cached = tmp_path / ".cache" / "gpu-agent" / "cache" / "inputs" / "sha256" / SHA
    assert cached.read_bytes() == DATA


def test_run_local_reports_an_input_it_cannot_have_and_runs_nothing(
    tmp_path: Path, test_image: str
) -> None:
    with serve_input(DATA) as server:
        result = _run_local(tmp_path, _spec(test_image, server.url("/wrong")))
    assert result.returncode == 1
    assert "error [input_digest_mismatch]" in result.stderr
    assert SHA not in result.stdout
