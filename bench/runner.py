"""The runner against ``docker run --rm`` with the same image and the same hardening flags.

Run with ``make bench`` (``python bench/runner.py --runs N``). A trivial job (``true``)
is run alternately through the runner (in this process, from ``run()`` to ``Finished``,
cleanup included) and through the Docker CLI; then 8 at once each way. Figures are printed
and written to ``bench/results/runner.json``; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from contextlib import aclosing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from images import build_busybox_image  # noqa: E402

from sandbox.docker_api import DockerClient  # noqa: E402
from sandbox.events import Finished  # noqa: E402
from sandbox.runner import Runner, RunnerConfig  # noqa: E402
from sandbox.spec import WorkloadSpec, load_spec  # noqa: E402

IMAGE = "gpu-agent-bench/busybox:1"
MiB = 1 << 20


def docker_run_argv(spec: WorkloadSpec, user: str) -> list[str]:
    """``docker run --rm`` with the flags the runner gives the same spec."""
    r = spec.resources
    uid, _, gid = user.partition(":")
    return [
        "docker", "run", "--rm", "--read-only", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "--init", "--ipc", "private",
        "--network", "none", "--memory", str(r.memory_bytes), "--memory-swap",
        str(r.memory_bytes), "--cpus", str(r.cpus), "--pids-limit", str(r.pids),
        "--shm-size", str(r.shm_bytes), "--user", user, "--workdir", spec.workdir,
        "--tmpfs", f"/scratch:rw,exec,nosuid,nodev,size={r.scratch_bytes},uid={uid},gid={gid}",
        "--tmpfs", "/tmp:rw,noexec,nosuid,nodev,size=67108864,mode=1777",
        "--ulimit", f"fsize={max(r.scratch_bytes, spec.output_max_bytes)}",
        "--ulimit", "nofile=4096", "--ulimit", "core=0",
        "--log-driver", "json-file", "--log-opt", "max-size=8m", "--log-opt", "max-file=1",
        "--label", "io.gpu-agent.bench=1", spec.image, *spec.command,
    ]  # fmt: skip


async def through_runner(runner: Runner, spec: WorkloadSpec, job_id: str) -> float:
    """Seconds from ``run()`` to ``Finished``."""
    start = time.perf_counter()
    async with aclosing(runner.run(job_id, spec, [])) as events:
        async for event in events:
            if isinstance(event, Finished):
                assert event.result.reason == "completed", event.result
    return time.perf_counter() - start


async def through_cli(argv: list[str]) -> float:
    """Seconds of one ``docker run --rm``."""
    start = time.perf_counter()
    process = await asyncio.create_subprocess_exec(*argv)
    assert await process.wait() == 0
    return time.perf_counter() - start


async def bench(runs: int) -> dict[str, float]:
    """Alternate runner and CLI ``runs`` times, then 8 at once each way."""
    spec = load_spec(json.dumps({"image": IMAGE, "command": ["true"]}).encode(), "json")
    with tempfile.TemporaryDirectory() as tmp:
        config = RunnerConfig(jobs_dir=Path(tmp) / "jobs")
        runner = Runner(DockerClient(), config)
        await runner.prepare()
        argv = docker_run_argv(spec, runner.user or f"{config.job_uid_base}:{config.job_uid_base}")
        await through_runner(runner, spec, "warm-up")
        await through_cli(argv)
        ours, theirs = [], []
        for i in range(runs):
            ours.append(await through_runner(runner, spec, f"bench-{i}"))
            theirs.append(await through_cli(argv))
        start = time.perf_counter()
        await asyncio.gather(*(through_runner(runner, spec, f"par-{i}") for i in range(8)))
        ours_8 = time.perf_counter() - start
        start = time.perf_counter()
        await asyncio.gather(*(through_cli(argv) for _ in range(8)))
        theirs_8 = time.perf_counter() - start
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {
        "runner_median_s": statistics.median(ours),
        "docker_run_median_s": statistics.median(theirs),
        "median_ratio": statistics.median(ratios),
        "overhead_ms": 1000 * (statistics.median(ours) - statistics.median(theirs)),
        "runner_8_at_once_s": ours_8,
        "docker_run_8_at_once_s": theirs_8,
    }


def main() -> None:
    """Build the image, run the benchmark, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as context:
        build_busybox_image(IMAGE, Path(context))
    results = asyncio.run(bench(args.runs))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "runner.json").write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        print(f"{key:28} {value:10.3f}")


if __name__ == "__main__":
    main()
