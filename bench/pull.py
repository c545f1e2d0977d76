"""Image pulls by digest: the agent's pull (``sandbox.engine.Engine.pull``, progress
parsed) against the bare Engine API call it wraps (``POST /images/create``, the answer
read and dropped), and ``docker pull``, in one run, from Debian's registry on loopback.

Run with ``python bench/pull.py --runs N --mib M``. An image of busybox and one layer of
M MiB of random bytes is pushed once; each run removes it from the engine, then pulls it
each way in turn. Then a job's second pull of a cached image is counted at the registry
(the requests its access log shows): none should reach it. Figures are printed and
written to ``bench/results/pull.json``; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.registry import push_busybox, running_registry  # noqa: E402
from support.stats import spread  # noqa: E402

from sandbox.docker_api import DockerClient  # noqa: E402
from sandbox.engine import Engine  # noqa: E402
from sandbox.engine_types import RegistryAuth  # noqa: E402
from sandbox.runner import Runner, RunnerConfig  # noqa: E402
from sandbox.spec import ImageRef  # noqa: E402

MiB = 1 << 20


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _remove(ref: str) -> None:
    subprocess.run(["docker", "image", "rm", "--force", ref], capture_output=True, check=False)


async def _timed(action: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), _cpu()
    await action()
    return time.perf_counter() - wall, _cpu() - cpu


async def main(runs: int, mib: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    try:
        with running_registry(work) as registry:
            tag = f"{registry.host}/bench/pull:1"
            pinned = push_busybox(registry, tag, os.urandom(mib * MiB), work)
            config = work / "docker-config"
            auth = RegistryAuth(
                username=registry.username, password=registry.password, serveraddress=registry.host
            )
            client = DockerClient()
            engine = Engine(client)
            encoded = base64.urlsafe_b64encode(msgspec.json.encode(auth)).decode()

            async def bare() -> None:
                lines = client.stream_lines(
                    "POST",
                    "/images/create",
                    params={"fromImage": pinned},
                    headers={"X-Registry-Auth": encoded},
                    idle_timeout_s=120,
                )
                async for _ in lines:
                    pass

            async def agent() -> None:
                await engine.pull(pinned, auth=auth, on_progress=lambda *_: None)

            async def cli() -> None:
                process = await asyncio.create_subprocess_exec(
                    "docker", "--config", str(config), "pull", "-q", pinned,
                    stdout=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                await process.wait()

            figures: dict[str, dict[str, list[float]]] = {}
            for _ in range(runs):
                for name, action in (("engine_api", bare), ("agent", agent), ("docker_cli", cli)):
                    _remove(pinned)
                    wall, cpu = await _timed(action)
                    entry = figures.setdefault(name, {"wall_s": [], "cpu_s": []})
                    entry["wall_s"].append(wall)
                    entry["cpu_s"].append(cpu)
            # A second job's pull of the cached image: the runner asks the engine first.
            before = len(registry.requests())
            runner = Runner(client, RunnerConfig(jobs_dir=work / "jobs"))
            again = await runner.prefetch(ImageRef.parse(pinned))
            cached_requests = len(registry.requests()) - before
            result: dict[str, object] = {
                "runs": runs,
                "image_mib": mib,
                "throughput_mib_s": {
                    name: spread([mib / w for w in entry["wall_s"]])
                    for name, entry in figures.items()
                },
                "wall_s": {name: spread(entry["wall_s"]) for name, entry in figures.items()},
                "this_process_cpu_s": {
                    name: spread(entry["cpu_s"]) for name, entry in figures.items()
                },
                "cached_second_pull": {
                    "pulled": again is not None,
                    "registry_requests": cached_requests,
                },
            }
            _remove(pinned)
            return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    figures = asyncio.run(main(args.runs, args.mib))
    text = json.dumps(figures, indent=2)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "pull.json").write_text(text + "\n")
