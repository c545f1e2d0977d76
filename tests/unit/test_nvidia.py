"""The NVIDIA backend through the real pynvml binding and a fake libnvidia-ml.so.1.

These tests need nothing outside this process; the others are in
tests/integration/test_nvidia.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.fakenvml import build
from support.nvml import nvml_config
from support.paths import XML

from hal.backends.nvidia import NvidiaBackend
from hal.errors import BackendUnavailable


def test_recorded_values_spot_check_rtx_3090() -> None:
    """A few values read off the capture by eye, so the parser is not its own referee."""
    capture = build.parse_capture(XML / "rtx-3090-v12.xml")
    assert capture.driver_version == "525.147.05"
    assert capture.gpus[0].memory_total_bytes == 24576 * 1024 * 1024


def test_missing_library_is_library_missing(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable) as missing:
        NvidiaBackend(nvml_config(tmp_path / "nowhere" / "libnvidia-ml.so.1", tmp_path)).open()
    assert missing.value.code == "library_missing"
