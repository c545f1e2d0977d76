"""Output uploads: the agent's uploader (``agent.jobs.uploader.put_file``: httpx, the
body streamed from the spool file and hashed on the way) against ``curl -T`` of the same
file to the same server on loopback (curl without ``Expect: 100-continue``, whose 1 s wait
for an answer the server does not send would flatter the agent).

Run with ``python bench/upload.py --runs N --mib M``. The server (tests/support/store.py:
reads each body to the end, hashes it, answers 200) runs in a child process, so neither
client is charged for it. Wall time and the client's CPU time (user + system) per run;
min/median/max printed and written to ``bench/results/upload.json``. Nothing asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

from agent.jobs.uploader import put_file  # noqa: E402
from agent.protocol.uploads import UploadTarget  # noqa: E402

MiB = 1 << 20
_SERVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from support.store import running_store
with running_store() as store:
    print(store.url, flush=True)
    sys.stdin.read()
"""


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 4),
        "median": round(statistics.median(values), 4),
        "max": round(max(values), 4),
    }


async def _agent(url: str, path: Path, size: int, sha256: str) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), _cpu(resource.RUSAGE_SELF)
    async with httpx.AsyncClient() as client:
        await put_file(client, path, UploadTarget(url=url), size=size, sha256=sha256)
    return time.perf_counter() - wall, _cpu(resource.RUSAGE_SELF) - cpu


def _curl(url: str, path: Path) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), _cpu(resource.RUSAGE_CHILDREN)
    subprocess.run(
        # "Expect:" off: else curl waits a second for a 100 Continue the server never sends.
        ["curl", "-sSf", "-H", "Expect:", "-o", os.devnull, "-T", str(path), url],
        check=True,
    )
    return time.perf_counter() - wall, _cpu(resource.RUSAGE_CHILDREN) - cpu


async def main(runs: int, mib: int) -> dict[str, object]:
    """Upload an ``mib`` MiB file ``runs`` times each way; the figures."""
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(ROOT / "tests")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        base = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "output.bin"
            digest = hashlib.sha256()
            with path.open("wb") as out:
                for _ in range(mib):
                    chunk = os.urandom(MiB)
                    digest.update(chunk)
                    out.write(chunk)
            size, sha256 = mib * MiB, digest.hexdigest()
            agent: list[tuple[float, float]] = []
            curl: list[tuple[float, float]] = []
            for run in range(runs):
                agent.append(await _agent(f"{base}/agent-{run}", path, size, sha256))
                curl.append(_curl(f"{base}/curl-{run}", path))
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(30)
    agent_mib_s = [mib / wall for wall, _ in agent]
    curl_mib_s = [mib / wall for wall, _ in curl]
    return {
        "mib": mib,
        "runs": runs,
        "agent": {
            "wall_s": _stats([w for w, _ in agent]),
            "cpu_s": _stats([c for _, c in agent]),
            "mib_per_s": _stats(agent_mib_s),
        },
        "curl": {
            "wall_s": _stats([w for w, _ in curl]),
            "cpu_s": _stats([c for _, c in curl]),
            "mib_per_s": _stats(curl_mib_s),
        },
        "agent_over_curl_median": round(
            statistics.median(agent_mib_s) / statistics.median(curl_mib_s), 3
        ),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    figures = asyncio.run(main(args.runs, args.mib))
    text = json.dumps(figures, indent=2)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "upload.json").write_text(text + "\n")
