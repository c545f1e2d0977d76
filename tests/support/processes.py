"""``gpu-agent run`` and ``gpu-coordinator serve`` as child processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from support.paths import XML

__all__ = [
    "DUAL_A5000",
    "Agent",
    "Coordinator",
    "assert_exactly_once_no_gaps",
    "free_port",
    "shutdown",
    "wait_for",
]

DUAL_A5000 = XML / "dual_a5000-v13.xml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Coordinator:
    """``gpu-coordinator serve`` as a child process, on a port that survives restarts."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        # Its own, not --port + 1 (the default), which another test may hold.
        self.artifacts_port = free_port()
        self.db = workdir / "coordinator.db"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--artifacts-port", str(self.artifacts_port),
             "--db", str(self.db), "--state-dir", str(self.workdir / "state"),
             "--gateway-port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert self.process.stdout is not None
        assert b"listening on" in self.process.stdout.readline()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()

    def public_key(self) -> str:
        shown = subprocess.run(
            [sys.executable, "-m", "coordinator.cli", "key", "--state-dir",
             str(self.workdir / "state")],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return next(line.split()[-1] for line in shown.splitlines() if "public key" in line)

    def seqs(self) -> list[tuple[int, str]]:
        """Every (seq, type) stored, in order (read while the coordinator runs: WAL)."""
        with sqlite3.connect(self.db) as db:
            rows = db.execute("SELECT seq, type FROM messages ORDER BY seq").fetchall()
        db.close()
        return [(int(seq), str(kind)) for seq, kind in rows]


class Agent:
    """``gpu-agent run`` as a child process, on a fake NVML serving a recorded capture."""

    def __init__(self, workdir: Path, library: Path, coordinator: Coordinator, key: str) -> None:
        self.argv = [
            sys.executable, "-m", "agent.cli", "run",
            "--coordinator", f"ws://127.0.0.1:{coordinator.port}/agent",
            "--coordinator-key", key, "--state-dir", str(workdir / "agent"),
            "--runtime-dir", str(workdir / "run"),
            "--interval", "0.05", "--batch", "2",
        ]  # fmt: skip
        self.env = {
            **os.environ,
            "GPU_AGENT_NVML_LIB": str(library),
            "GPU_AGENT_SYSFS_ROOT": str(workdir / "sys"),
        }
        self.log = workdir / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log)

    def stop(self) -> int:
        """SIGTERM: stop sampling, flush the outbox, exit."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def assert_exactly_once_no_gaps(seqs: list[tuple[int, str]]) -> None:
    numbers = [seq for seq, _ in seqs]
    assert numbers == list(range(1, len(numbers) + 1))
    assert numbers  # something was delivered at all


def shutdown(coordinator: Coordinator, agent: Agent) -> None:
    """Kill whichever of the two still runs, and close what they left open."""
    for process in (agent.process, coordinator.process):
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
    if coordinator.process is not None and coordinator.process.stdout is not None:
        coordinator.process.stdout.close()
