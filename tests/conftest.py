"""What many tests share: the recorded captures, and the fake NVML built from them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fakenvml import build

# shared/ lies beside the repository, on a developer's machine and in CI alike.
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
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
