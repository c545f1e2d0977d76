"""Driving the fake NVML (support/fakenvml): HAL settings on it, faults through its control file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hal.backend import HalConfig

__all__ = ["nvml_config", "write_control"]


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
    """Give the fake NVML new faults or events (support/fakenvml/build.py, control file)."""
    # The fake re-reads its control file when the inode changes: replace, do not rewrite.
    staging = path.with_suffix(".new")
    staging.write_text(text)
    os.replace(staging, path)
