"""Input fetch throughput against curl: `python bench/input_fetch.py [--size-mib N] [--runs R]`.

A file of N MiB (random bytes) is served on 127.0.0.1 by a child process (an asyncio
server that answers with ``sendfile``, so that the server is not what is measured). Then
R rounds of each of these, in an order that rotates from one round to the next (the
second of a round is the slower, whatever it is; a multiple of 3 gives each method
each place equally often):

- ``curl -s -o FILE URL`` (its CPU time from the children's rusage);
- the agent's :func:`agent.inputs.fetch.fetch` into a file: streamed, size-capped, sha256
  checked (its CPU time from this process's rusage: the server is another process);
- the agent's whole cache path, :meth:`agent.inputs.cache.InputCache.use` on an empty
  cache: the fetch plus the fsync and rename that make an entry whole.

Each run starts after ``sync``, so that none pays for the one before's writeback. Prints
one JSON object: min/median/max wall seconds and MiB/s, CPU seconds per run and
CPU seconds per GiB, per method, and the agent/curl ratio of median throughputs. On a
busy host, runs are bimodal: some pay several times the usual system time (in the
kernel, not in Python: user time stays put), so read the max with the median, and run
it while the host is quiet when you can.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

from agent.inputs.cache import InputCache  # noqa: E402
from agent.inputs.fetch import FetchLimits, fetch  # noqa: E402

_SERVER = r"""
import asyncio, os, sys

PATH = sys.argv[1]
SIZE = os.path.getsize(PATH)

async def handle(reader, writer):
    while True:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            break  # the client closed its connection
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % SIZE)
        with open(PATH, "rb") as f:
            await asyncio.get_running_loop().sendfile(writer.transport, f)
    writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

try:
    asyncio.run(main())
except KeyboardInterrupt:
    pass
"""


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _curl(url: str, out: Path) -> tuple[float, float]:
    cpu, start = _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(["curl", "-s", "-f", "-o", str(out), url], check=True)
    return time.perf_counter() - start, _cpu(resource.RUSAGE_CHILDREN) - cpu


async def _agent(url: str, out: Path, sha256: str, size: int) -> tuple[float, float]:
    cpu, start = _cpu(resource.RUSAGE_SELF), time.perf_counter()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        await fetch(
            url,
            fd,
            sha256=sha256,
            size_bytes=size,
            allowed_hosts=["127.0.0.1"],
            limits=FetchLimits(),
        )
    finally:
        os.close(fd)
    return time.perf_counter() - start, _cpu(resource.RUSAGE_SELF) - cpu


async def _cached(url: str, root: Path, sha256: str, size: int) -> tuple[float, float]:
    shutil.rmtree(root, ignore_errors=True)
    cache = InputCache(root, size)
    cache.open()

    async def fill(fd: int) -> None:
        await fetch(
            url,
            fd,
            sha256=sha256,
            size_bytes=size,
            allowed_hosts=["127.0.0.1"],
            limits=FetchLimits(),
        )

    cpu, start = _cpu(resource.RUSAGE_SELF), time.perf_counter()
    async with cache.use(sha256, size, fill):
        pass
    return time.perf_counter() - start, _cpu(resource.RUSAGE_SELF) - cpu


def _summary(runs: list[tuple[float, float]], size: int) -> dict[str, float]:
    walls = [wall for wall, _ in runs]
    cpus = [cpu for _, cpu in runs]
    mib = size / (1 << 20)
    return {
        "wall_s_min": round(min(walls), 3),
        "wall_s_median": round(statistics.median(walls), 3),
        "wall_s_max": round(max(walls), 3),
        "mib_s_min": round(mib / max(walls), 1),
        "mib_s_median": round(mib / statistics.median(walls), 1),
        "mib_s_max": round(mib / min(walls), 1),
        "cpu_s_median": round(statistics.median(cpus), 3),
        "cpu_s_per_gib": round(statistics.median(cpus) / (size / (1 << 30)), 3),
    }


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args()
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
        work = Path(tmp)
        source = work / "source.bin"
        digest = hashlib.sha256()
        with source.open("wb") as out:
            for _ in range(args.size_mib):
                block = os.urandom(1 << 20)
                digest.update(block)
                out.write(block)
        server = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(source)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            url = f"http://127.0.0.1:{server.stdout.readline().strip()}/source.bin"
            sha = digest.hexdigest()
            methods: dict[str, Callable[[], tuple[float, float]]] = {
                "curl": lambda: _curl(url, work / "curl.bin"),
                "agent": lambda: asyncio.run(_agent(url, work / "agent.bin", sha, size)),
                "cache": lambda: asyncio.run(_cached(url, work / "cache", sha, size)),
            }
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
            for run in range(args.runs):
                # Whichever goes second in a round is slower (by up to 2x here, whatever it
                # is): the order rotates, so that each method has each place as often.
                names = list(methods)[run % 3 :] + list(methods)[: run % 3]
                for name in names:
                    # Each starts with no dirty pages: the one after a write must not pay
                    # for the writeback of the one before.
                    os.sync()
                    runs[name].append(methods[name]())
                for name in ("curl.bin", "agent.bin"):
                    (work / name).unlink()
        finally:
            server.terminate()
            server.wait()
    figures = {name: _summary(each, size) for name, each in runs.items()}
    curl = figures["curl"]["mib_s_median"]
    print(
        json.dumps(
            {
                "size_mib": args.size_mib,
                "runs": args.runs,
                **figures,
                "agent_vs_curl": round(figures["agent"]["mib_s_median"] / curl, 2),
                "cache_vs_curl": round(figures["cache"]["mib_s_median"] / curl, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
