"""``gpu-agent`` as a child process, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["run_cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )
