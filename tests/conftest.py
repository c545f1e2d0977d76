"""What many tests share: the recorded captures, and the fake NVML built from them."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakenvml import build
from images import build_busybox_image

from hal.backend import HalConfig
from hal.backends.nvidia import NvidiaBackend
from hal.types import GpuProfile

# Recorded real devices, with their sources and licences (fixtures/SOURCES.md).
FIXTURES = Path(__file__).resolve().parent / "fixtures"
XML = FIXTURES / "nvidia-smi-xml"
TXT = FIXTURES / "nvidia-smi-captures"
CAPTURES = sorted([*XML.glob("*.xml"), *TXT.glob("*.txt")])
SYSFS = FIXTURES / "sysfs-procfs" / "sys"

if len(CAPTURES) < 25:
    raise RuntimeError(f"the recorded captures are missing from {FIXTURES}")


@pytest.fixture(scope="session")
def library_for(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Path]:
    """Builds the fake libnvidia-ml.so.1 for a capture, once per session."""
    built: dict[Path, Path] = {}

    def library(capture: Path) -> Path:
        if capture not in built:
            out = tmp_path_factory.mktemp(capture.stem)
            built[capture] = build.build_library(build.parse_capture(capture), out)
        return built[capture]

    return library


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """Where a test builds its sysfs tree."""
    return tmp_path / "sys"


@pytest.fixture
def dev(tmp_path: Path) -> Path:
    """An empty /dev for a test to stand device nodes in."""
    path = tmp_path / "dev"
    path.mkdir()
    return path


# ------------------------------------------------------------------ the Docker engine

TEST_IMAGE = "gpu-agent-test/busybox:1"


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """The engine's socket; skips, or fails under GPU_AGENT_REQUIRE_DOCKER=1, without one."""
    socket_path = "/var/run/docker.sock"
    probe = (
        subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if shutil.which("docker")
        else None
    )
    if probe is None or probe.returncode != 0:
        reason = "no Docker engine reachable" + (f": {probe.stderr.strip()}" if probe else "")
        if os.environ.get("GPU_AGENT_REQUIRE_DOCKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return socket_path


@pytest.fixture(scope="session")
def test_image(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local image of static busybox (nothing can be pulled here), with a setuid copy."""
    return build_busybox_image(TEST_IMAGE, tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="session")
def test_image_id(test_image: str) -> str:
    """The test image's id, ``sha256:<hex>``: how an offer pins an image built here (an
    offer never names a tag)."""
    return subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", test_image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def require_runtime(runtime: str) -> None:
    """Skip, or fail under GPU_AGENT_REQUIRE_DOCKER=1, when the engine lacks a runtime."""
    listed = subprocess.run(
        ["docker", "info", "--format", "{{json .Runtimes}}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    if f'"{runtime}"' in listed:
        return
    reason = f"the Docker engine has no {runtime} runtime"
    if os.environ.get("GPU_AGENT_REQUIRE_DOCKER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def nvml_config(library: Path, tmp_path: Path, **overrides: Any) -> HalConfig:
    """HAL settings for the NVML backend alone, on a fake library, with empty trees."""
    settings: dict[str, Any] = {
        "nvml_library": str(library),
        "sysfs_root": tmp_path / "sys",
        "dev_root": tmp_path / "dev",
        "backends": ("nvml",),
    }
    settings.update(overrides)
    return HalConfig(**settings)


def write_control(path: Path, text: str) -> None:
    """Give the fake NVML new faults or events (tests/fakenvml/build.py, control file)."""
    # The fake re-reads its control file when the inode changes: replace, do not rewrite.
    staging = path.with_suffix(".new")
    staging.write_text(text)
    os.replace(staging, path)


@pytest.fixture
def control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake NVML's control file, named in ``FAKENVML_CONTROL`` (absent: no faults)."""
    path = tmp_path / "control"
    monkeypatch.setenv("FAKENVML_CONTROL", str(path))
    return path


@pytest.fixture
def nvidia_for(
    library_for: Callable[[Path], Path], tmp_path: Path, control: Path
) -> Iterator[Callable[[Path], tuple[NvidiaBackend, list[GpuProfile]]]]:
    """Opens the NVIDIA backend in this process on a capture's fake library (faults from
    ``control``); the backends and their profiles; closed after the test."""
    opened: list[NvidiaBackend] = []

    def backend(capture: Path) -> tuple[NvidiaBackend, list[GpuProfile]]:
        nvidia = NvidiaBackend(nvml_config(library_for(capture), tmp_path))
        profiles = nvidia.open()
        opened.append(nvidia)
        return nvidia, profiles

    yield backend
    for nvidia in opened:
        nvidia.close()
