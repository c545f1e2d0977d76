"""The command line as a user runs it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from conftest import XML

from agent import cli
from hal.types import Profile, Sample


@pytest.fixture
def no_gpu(tmp_path: Path) -> dict[str, str]:
    """Settings under which this machine shows no GPU, whatever it has."""
    return {
        "GPU_AGENT_NVML_LIB": str(tmp_path / "missing" / "libnvidia-ml.so.1"),
        "GPU_AGENT_SYSFS_ROOT": str(tmp_path),
    }


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sample", "--interval", "0"], "must be greater than 0"),
        (["sample", "--interval", "fast"], "is not a number"),
        (["sample", "--count", "-1"], "must be 0 (forever) or more"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments_get_a_coded_error_and_exit_2(args: list[str], message: str) -> None:
    result = _run(*args)
    assert result.returncode == 2
    assert "error [bad_argument]" in result.stderr
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(("args", "status"), [(["--bogus"], 2), (["--help"], 0)])
def test_profile_that_does_not_run_stops_the_discovery_it_started(
    args: list[str], status: int, library_for: Callable[[Path], Path], tmp_path: Path
) -> None:
    """`profile` starts discovery before parsing; a usage error or --help must end it."""
    env = {
        **os.environ,
        "GPU_AGENT_NVML_LIB": str(library_for(XML / "dual_a5000-v13.xml")),
        "GPU_AGENT_DISCOVERY_TIMEOUT": "600",
        "FAKENVML_INIT_HANG": "1",
        "DOCKER_HOST": f"unix://{tmp_path / 'docker.sock'}",
    }
    # Its own process group: a discovery child left behind would still be in it.
    shown = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "profile", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        _, stderr = shown.communicate(timeout=60)
        assert shown.returncode == status, stderr
        assert _group_ends(shown.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shown.pid, signal.SIGKILL)


def _group_ends(pgid: int) -> bool:
    """Whether process group ``pgid`` is gone, or goes within 5 s (a zombie being reaped)."""
    for _ in range(100):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(("argv", "as_json"), list(cli._PLAIN_PROFILE.items()))
def test_profile_lines_read_without_argparse_are_read_as_argparse_reads_them(
    argv: tuple[str, ...], as_json: bool
) -> None:
    assert vars(cli._parser().parse_args(argv)) == {"command": "profile", "json": as_json}


def test_bad_environment_setting_is_refused_with_its_name() -> None:
    result = _run("profile", env={"GPU_AGENT_DISCOVERY_TIMEOUT": "soon"})
    assert result.returncode == 2
    assert "error [bad_config]" in result.stderr
    assert "GPU_AGENT_DISCOVERY_TIMEOUT" in result.stderr


def test_profile_json_is_the_whole_typed_profile(no_gpu: dict[str, str]) -> None:
    result = _run("profile", "--json", env=no_gpu)
    assert result.returncode == 0, result.stderr
    profile = msgspec.json.decode(result.stdout, type=Profile)
    nvml = next(b for b in profile.backends if b.name == "nvml")
    assert nvml.status == "unavailable"
    assert nvml.code == "library_missing"
    assert profile.host.memory_total_bytes > 0


def test_profile_table_names_each_backend_and_why_it_found_nothing(no_gpu: dict[str, str]) -> None:
    result = _run("profile", env=no_gpu)
    assert result.returncode == 0, result.stderr
    assert "nvml     unavailable (library_missing)" in result.stdout


def test_sample_prints_count_json_lines() -> None:
    result = _run("sample", "--interval", "0.05", "--count", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    samples = [msgspec.json.decode(line, type=Sample) for line in lines]
    assert samples[0].taken_at < samples[1].taken_at < samples[2].taken_at


def test_doctor_on_a_machine_without_gpus_exits_non_zero_with_fixes(no_gpu: dict[str, str]) -> None:
    result = _run("doctor", env=no_gpu)
    assert result.returncode == 1
    assert "[BLOCKER] no_gpus" in result.stdout
    assert "fix:" in result.stdout


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://127.0.0.1:1/agent", "bad_config"),
        ("ws://192.0.2.10:8765/agent", "bad_config"),
    ],
)
def test_run_refuses_an_unsafe_coordinator_url(url: str, code: str, tmp_path: Path) -> None:
    key = "A" * 43 + "="
    result = _run(
        "run", "--coordinator", url, "--coordinator-key", key, "--state-dir", str(tmp_path)
    )
    assert result.returncode == 2
    assert f"error [{code}]" in result.stderr


def test_profile_imports_nothing_it_does_not_need(
    library_for: Callable[[Path], Path], tmp_path: Path
) -> None:
    """`gpu-agent profile` must start fast (bench/hal_profile.py): these modules cost
    milliseconds each and serve only other commands or error paths, in the parent and in
    the discovery children alike."""
    env = {
        **os.environ,
        "GPU_AGENT_NVML_LIB": str(library_for(XML / "dual_a5000-v13.xml")),
        "DOCKER_HOST": f"unix://{tmp_path / 'docker.sock'}",
    }
    shown = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "agent.cli", "profile", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in shown.stderr.splitlines()}
    assert "hal.machine" in imported  # the measurement sees the profile's own imports
    assert imported.isdisjoint({"logging", "argparse", "asyncio", "sqlite3", "agent.control.wire"})
