"""The coordinator's dashboard rendered by a headless Chromium."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["render"]

_CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--virtual-time-budget=5000",  # let the page's fetches and first refreshes finish
]


def render(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run with a new, empty profile directory."""
    profile.mkdir()
    return subprocess.run(
        [chromium, *_CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
