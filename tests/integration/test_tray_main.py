"""``gpu-agent-tray`` as a process: one per session, ended cleanly by SIGTERM (systemd
stopping the user unit) even with no daemon to talk to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TRAY = Path(sys.executable).parent / "gpu-agent-tray"


def _env(runtime: Path) -> dict[str, str]:
    return {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(runtime)}


def test_the_console_script_is_installed() -> None:
    result = subprocess.run(
        [str(TRAY), "--help"], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.startswith("usage: gpu-agent-tray")
    assert "Quitting it leaves the agent running" in result.stdout


def test_one_tray_a_session_and_sigterm_ends_it(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    argv = [str(TRAY), "--socket", str(tmp_path / "no-agent.sock")]
    first = subprocess.Popen(
        argv, env=_env(runtime), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        lock = runtime / "gpu-agent-tray.lock"
        deadline = time.monotonic() + 60
        while not lock.exists():
            if first.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the tray did not start: {first.communicate()}")
            time.sleep(0.05)
        second = subprocess.run(
            argv, env=_env(runtime), capture_output=True, text=True, timeout=60, check=False
        )
        assert (second.returncode, second.stderr.strip()) == (
            0,
            "gpu-agent-tray: already running in this session",
        )
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
        assert not lock.exists()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.communicate()
