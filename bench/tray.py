"""The tray's cost at rest: `python bench/tray.py [--seconds S] [--rate R]`.

``gpu-agent-tray`` runs as a child (Qt's offscreen platform: no display needed) against a
live control socket, and its CPU share and RSS are read over S seconds, after it has
started, connected and read the settings:

- ``real_daemon``: ``gpu-agent run`` on a fake NVML (a recorded A5000 capture, sampled
  every second), connected to a reference coordinator in this process; no jobs. The states
  the daemon published meanwhile are counted by a subscriber of this bench's own.
- ``busy_stream``: the real control server over the tests' in-memory daemon, publishing a
  new state R times a second (GPU readings changing): the cost per state.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT / "tests")

import msgspec  # noqa: E402
import psutil  # noqa: E402
from support.fakenvml import build  # noqa: E402
from support.tray_daemon import ServedTarget  # noqa: E402

from agent.control.client import ControlClient  # noqa: E402
from coordinator.server import Coordinator  # noqa: E402

CAPTURE = ROOT / "tests" / "fixtures" / "nvidia-smi-xml" / "dual_a5000-v13.xml"
WARM_UP_S = 5.0


def _start_tray(socket: Path, runtime: Path) -> subprocess.Popen[bytes]:
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(runtime)}
    argv = [sys.executable, "-m", "agent.tray.main", "--socket", str(socket)]
    return subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


async def _measure(pid: int, seconds: float) -> dict[str, float]:
    process = psutil.Process(pid)
    cpu0, wall0 = sum(process.cpu_times()[:2]), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, wall1 = sum(process.cpu_times()[:2]), time.monotonic()
    return {
        "cpu_pct_of_one_core": 100 * (cpu1 - cpu0) / (wall1 - wall0),
        "rss_mib": process.memory_info().rss / 2**20,
        "seconds": round(wall1 - wall0, 1),
    }


async def _count_states(socket: Path, counted: list[int]) -> None:
    async with await ControlClient.connect(socket) as client:
        async for _ in client.subscribe():
            counted[0] += 1


async def real_daemon(seconds: float, workdir: Path) -> dict[str, object]:
    """The tray on the real daemon at rest."""
    library = build.build_library(build.parse_capture(CAPTURE), workdir / "nvml")
    coordinator = Coordinator(db_path=workdir / "coordinator.db", state_dir=workdir / "coord")
    await coordinator.start()
    socket = workdir / "run" / "agent.sock"
    argv = [
        sys.executable, "-m", "agent.cli", "run", "--coordinator", coordinator.url,
        "--coordinator-key", coordinator.key.public_key_b64,
        "--state-dir", str(workdir / "agent"), "--interval", "1",
        "--runtime-dir", str(socket.parent),
    ]  # fmt: skip
    env = {**os.environ, "GPU_AGENT_NVML_LIB": str(library)}
    with (workdir / "agent.log").open("wb") as log:
        agent = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not coordinator.connected() or not socket.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the agent did not connect")
            await asyncio.sleep(0.05)
        tray = _start_tray(socket, workdir / "tray-run")
        try:
            await asyncio.sleep(WARM_UP_S)
            counted = [0]
            counter = asyncio.create_task(_count_states(socket, counted))
            measured = await _measure(tray.pid, seconds)
            counter.cancel()
            await asyncio.gather(counter, return_exceptions=True)
            return {**measured, "states_published": max(0, counted[0] - 1)}
        finally:
            _stop(tray)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
        await coordinator.stop()


async def busy_stream(seconds: float, rate: float, workdir: Path) -> dict[str, object]:
    """The tray following a daemon whose state changes ``rate`` times a second."""
    daemon = ServedTarget(workdir / "agent.sock")
    daemon.start()
    tray = _start_tray(daemon.path, workdir / "tray-run")
    published = 0

    async def publish() -> None:
        nonlocal published
        while True:
            published += 1
            gpu = msgspec.structs.replace(
                daemon.target.state.gpus[0], utilization_pct=float(published % 100)
            )
            daemon.change(gpus=[gpu, *daemon.target.state.gpus[1:]])
            await asyncio.sleep(1 / rate)

    try:
        await asyncio.sleep(WARM_UP_S)
        publisher = asyncio.create_task(publish())
        await asyncio.sleep(1)
        published = 0
        measured = await _measure(tray.pid, seconds)
        count = published
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        return {**measured, "states_published": count}
    finally:
        _stop(tray)
        daemon.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=10.0, help="busy_stream's states a second")
    args = parser.parse_args()
    result: dict[str, object] = {}
    # Short paths: a unix socket's may have 107 bytes at most.
    with tempfile.TemporaryDirectory(prefix="gpa-bench-") as tmp:
        result["real_daemon"] = asyncio.run(real_daemon(args.seconds, Path(tmp)))
    with tempfile.TemporaryDirectory(prefix="gpa-bench-") as tmp:
        result["busy_stream"] = asyncio.run(busy_stream(args.seconds, args.rate, Path(tmp)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
