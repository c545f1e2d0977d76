"""What a job's output flood costs the host outside the job's CPU cap.

Run by hand (``python bench/log_flood.py``): a ``yes ''`` job at ``cpus=0.2`` runs for
``--seconds`` through the runner, while the CPU time of the engine's processes (dockerd,
containerd, the containerd shims) is read from /proc; the job's own charge comes from its
cgroup, this process's from ``os.times``. Figures are printed and written to
``bench/results/log_flood.json``; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from contextlib import aclosing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from images import build_busybox_image  # noqa: E402

from sandbox.docker_api import DockerClient  # noqa: E402
from sandbox.events import Finished, JobResult  # noqa: E402
from sandbox.runner import Runner, RunnerConfig  # noqa: E402
from sandbox.spec import load_spec  # noqa: E402

IMAGE = "gpu-agent-bench/busybox:1"
# /proc/<pid>/comm is cut at 15 characters: "containerd-shim-runc-v2" reads "containerd-shim".
ENGINE = ("dockerd", "containerd", "containerd-shim")
TICKS = os.sysconf("SC_CLK_TCK")


def engine_ticks() -> dict[int, int]:
    """User plus system clock ticks of each engine process now."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() not in ENGINE:
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(entry.name)] = int(fields[11]) + int(fields[12])
    return found


async def flood(seconds: float) -> dict[str, float]:
    """Run the flood; the host's and the job's CPU seconds."""
    spec = load_spec(
        json.dumps(
            {
                "image": IMAGE,
                "command": ["yes", ""],
                "timeout_s": seconds,
                "grace_s": 0,
                "resources": {"cpus": 0.2},
            }
        ).encode(),
        "json",
    )
    first = engine_ticks()
    last = dict(first)
    own = os.times()
    start = time.monotonic()
    result: JobResult | None = None
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(DockerClient(), RunnerConfig(jobs_dir=Path(tmp) / "jobs"))
        await runner.prepare()
        async with aclosing(runner.run("flood", spec, [])) as events:
            async for event in events:
                last.update(engine_ticks())  # shims come and go: keep their last reading
                if isinstance(event, Finished):
                    result = event.result
    last.update(engine_ticks())
    wall = time.monotonic() - start
    spent = os.times()
    assert result is not None
    engine = sum(ticks - first.get(pid, 0) for pid, ticks in last.items()) / TICKS
    return {
        "timeout_s": seconds,
        "wall_s": wall,
        "engine_cpu_s": engine,
        "engine_cores": engine / wall,
        "agent_cpu_s": (spent.user + spent.system) - (own.user + own.system),
        "job_cpu_s": result.cpu_seconds or 0.0,
        "log_bytes": result.log_bytes,
        "log_drained_bytes": result.log_bytes + result.log_dropped_bytes,
    }


def main() -> None:
    """Build the image, run the flood, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as context:
        build_busybox_image(IMAGE, Path(context))
    results = asyncio.run(flood(args.seconds))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "log_flood.json").write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        print(f"{key:20} {value:14.3f}")


if __name__ == "__main__":
    main()
