"""The daemon's job path and idle cost: `python bench/daemon.py [--jobs N] [--idle-s S]`.

A reference coordinator runs in this process on 127.0.0.1:0; ``gpu-agent run`` runs as a
child on a fake NVML serving 8 GPUs (a recorded A5000 capture, replicated), with a policy
that allows the locally built busybox image. Measured:

- offer to container start: from ``Coordinator.submit`` to the receipt's ``started_at``
  (Docker's own start stamp), for a trivial job (``true``), N times;
- result to coordinator: from the receipt's ``finished_at`` to the moment the coordinator's
  store shows the job final with its verified receipt (polled every millisecond);
- the idle daemon's CPU share and RSS over S seconds of sampling at 1 Hz, no jobs;
- an owner guard tripping (through the control API) to the job's container stopped.

Needs a Docker engine. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT / "tests")

import psutil  # noqa: E402
from support.fakenvml import build  # noqa: E402
from support.images import build_busybox_image  # noqa: E402

from agent.control.client import ControlClient  # noqa: E402
from agent.owner.policy import WEEKDAYS  # noqa: E402
from coordinator.server import Coordinator  # noqa: E402

CAPTURE = ROOT / "tests" / "fixtures" / "nvidia-smi-xml" / "dual_a5000-v13.xml"
IMAGE = "gpu-agent-bench/busybox:1"


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"median_ms": statistics.median(ordered) * 1e3, "p99_ms": p99 * 1e3}


async def _wait(condition: object, timeout: float, poll_s: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        await asyncio.sleep(poll_s)


async def bench(jobs: int, idle_s: float, workdir: Path) -> dict[str, object]:
    library = build.build_library(
        build.replicate(build.parse_capture(CAPTURE), 8), workdir / "nvml"
    )
    (workdir / "image").mkdir()
    build_busybox_image(IMAGE, workdir / "image")
    policy = workdir / "policy.toml"
    policy.write_text(f'allowed_images = ["{IMAGE.split(":", maxsplit=1)[0]}"]\n')
    coordinator = Coordinator(db_path=workdir / "coordinator.db", state_dir=workdir / "coord")
    await coordinator.start()
    key = coordinator.key.public_key_b64
    argv = [
        sys.executable, "-m", "agent.cli", "run", "--coordinator", coordinator.url,
        "--coordinator-key", key, "--state-dir", str(workdir / "agent"),
        "--policy", str(policy), "--interval", "1", "--runtime-dir", str(workdir / "run"),
    ]  # fmt: skip
    env = {**os.environ, "GPU_AGENT_NVML_LIB": str(library)}
    log = (workdir / "agent.log").open("wb")
    agent = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        store = coordinator.store
        await _wait(lambda: bool(coordinator.connected()), 30, 0.05)
        [node_id] = coordinator.connected()
        # The node reports capacity once its GPUs were checked: offers go out after that.
        await _wait(lambda: store.nodes.latest(node_id, "node_status") is not None, 30, 0.05)

        # Idle first, before any job ran.
        process = psutil.Process(agent.pid)
        await asyncio.sleep(2)
        cpu0, wall0 = sum(process.cpu_times()[:2]), time.monotonic()
        await asyncio.sleep(idle_s)
        cpu1, wall1 = sum(process.cpu_times()[:2]), time.monotonic()
        idle = {
            "cpu_pct_of_one_core": 100 * (cpu1 - cpu0) / (wall1 - wall0),
            "rss_mib": process.memory_info().rss / 2**20,
            "seconds": round(wall1 - wall0, 1),
        }

        to_start: list[float] = []
        to_coordinator: list[float] = []
        spec = {"image": IMAGE, "command": ["true"], "timeout_s": 60}
        for _ in range(jobs):
            submitted = time.time()
            job_id = await coordinator.submit(node_id, spec)

            def final(job_id: str = job_id) -> bool:
                row = store.jobs.get(job_id)
                return row is not None and row.final and row.result is not None

            await _wait(final, 60)
            seen = time.time()
            row = store.jobs.get(job_id)
            assert row is not None
            assert row.result is not None
            receipt = row.result.receipt
            if row.state != "completed":
                raise RuntimeError(f"{job_id} ended {row.state} ({row.code}): {row.detail}")
            to_start.append(receipt["started_at"] - submitted)
            to_coordinator.append(seen - receipt["finished_at"])
        guard = await _guard_to_stop(coordinator, node_id, workdir / "run" / "agent.sock")
        return {
            "jobs": jobs,
            "guard_trip_to_container_stop": guard,
            "offer_to_container_start": _percentiles(to_start),
            "result_to_coordinator": _percentiles(to_coordinator),
            "idle_daemon_8_gpus": idle,
        }
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
        log.close()
        await coordinator.stop()


async def _guard_to_stop(coordinator: Coordinator, node_id: str, socket: Path) -> dict[str, float]:
    """From an owner guard tripping (a schedule that excludes now, set through the control
    API, which applies it at once) to the preempted job's container stopped (Docker's
    FinishedAt). A guard tripped by a reading (heat, idle) is seen at the next sample tick,
    so add up to one sample interval for those."""
    store = coordinator.store
    elsewhere = WEEKDAYS[(datetime.now().weekday() + 2) % 7]
    delays = []
    async with await ControlClient.connect(socket) as client:
        for _ in range(5):
            job_id = await coordinator.submit(
                node_id, {"image": IMAGE, "command": ["sleep", "300"], "grace_s": 5}
            )

            def running(job_id: str = job_id) -> bool:
                row = store.jobs.get(job_id)
                return row is not None and row.state == "running"

            def final(job_id: str = job_id) -> bool:
                row = store.jobs.get(job_id)
                return row is not None and row.final and row.result is not None

            try:
                await _wait(running, 60)
            except TimeoutError:
                row = store.jobs.get(job_id)
                raise RuntimeError(f"{job_id} did not run: {row}") from None
            tripped = time.time()
            await client.set_settings({"schedule": [{"days": [elsewhere], "end": "00:01"}]})
            await _wait(final, 60)
            row = store.jobs.get(job_id)
            assert row is not None
            assert row.result is not None
            if row.state != "preempted":
                raise RuntimeError(f"{job_id} ended {row.state}, not preempted")
            delays.append(row.result.receipt["finished_at"] - tripped)
            await client.set_settings({"schedule": []})
    return _percentiles(delays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--idle-s", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpu-agent-bench-") as tmp:
        result = asyncio.run(bench(args.jobs, args.idle_s, Path(tmp)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
