"""The packaging files, the paths the packages install to, and the tools that check them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

__all__ = ["EXEC_START", "MAKE_VENV", "PACKAGING", "ROOT", "TRAY_EXEC_START", "require_tool"]

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
EXEC_START = "/opt/gpu-agent/venv/bin/gpu-agent"
MAKE_VENV = "/usr/lib/gpu-agent/make-venv"
TRAY_EXEC_START = "/opt/gpu-agent/tray-venv/bin/gpu-agent-tray"


def require_tool(*tools: str) -> None:
    """Skip where a tool is missing; in CI, fail: the check must not go quietly."""
    missing = [t for t in tools if not (shutil.which(t) or Path(t).exists())]
    if missing:
        message = f"missing here: {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
