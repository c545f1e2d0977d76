"""The tunnel's overhead: a service reached through the coordinator's gateway and the
node's data connection against the same service reached straight, side by side in one run.

Processes on loopback: this one (the reference coordinator, in process, with its
gateway), the agent's :class:`agent.services.tunnel.ServiceTunnel` (tests/support/
tunnel_agent.py), the service, a plain HTTP/1.1 server (tests/support/tunnel_target.py;
each answer closes its connection), and the client, in a process of its own (what a user
runs: nothing of the client's is charged to the coordinator's process). Every request is
``POST /v1/completions`` asking model ``bulk`` for an answer: straight to the service, or
to the gateway with an API key (gateway -> tunnel -> agent -> service; the replica is a
service job the store holds ready). Each run measures, both ways:

- latency: ``--requests`` small answers (100 bytes) one after another by a Python client,
  each on a new TCP connection; p50 and p99 (goal: at most 2 ms added at p50);
- bulk: one answer of ``--mib`` MiB read to the end and dropped by ``curl -o /dev/null``;
  MiB/s by curl's ``time_total`` (goal: the tunnel at least 0.8x straight);
- tokens: a stream of ``--tokens`` server-sent events, each written on its own as a model
  server does, read to the end by the Python client; events/s (the issue's goal: at
  least 0.95x straight);

with wall time and the CPU time (user + system) of every process beside it (and, for
bulk, of the coordinator's, the agent's and curl's apart, and the kernel's share).
Run with ``python bench/tunnel.py --runs N``; min/median/max over runs printed and written
to ``bench/results/tunnel.json``. Nothing asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT / "tests")

from support.gateway import new_key, report, service_spec  # noqa: E402
from support.stats import spread  # noqa: E402
from support.tunnel_target import BULK_PATH  # noqa: E402

from agent.link.identity import load_or_create  # noqa: E402
from agent.protocol import crypto  # noqa: E402
from agent.protocol.memory import reuse_freed_memory  # noqa: E402
from agent.services.tunnel import tunnel_url  # noqa: E402
from coordinator.server import Coordinator  # noqa: E402

MiB = 1 << 20
_TARGET = str(ROOT / "tests" / "support" / "tunnel_target.py")  # the service
#: The client of the latency and token legs: ``count`` times the request read from stdin,
#: each on a new connection, read to the end; prints the latencies, the last answer's size
#: and its status line.
_CLIENT = """
import asyncio, json, sys, time

async def main(port, count):
    data = sys.stdin.buffer.read()
    latencies, size = [], 0
    for _ in range(count):
        start = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        size, head = 0, b""
        while chunk := await reader.read(1 << 20):
            head = head or chunk[:15]
            size += len(chunk)
        writer.close()
        await writer.wait_closed()
        latencies.append(time.perf_counter() - start)
    print(json.dumps({"latencies": latencies, "size": size, "status": head.decode()}))

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


class _Cpu:
    """CPU seconds (user + system) of the processes."""

    def __init__(self, agent: int, target: int) -> None:
        self.agent = psutil.Process(agent)
        self.target = psutil.Process(target)

    def now(self) -> tuple[float, float, float, float, float, float]:
        """This process's (the coordinator's), the agent's, theirs and the service's, the
        children's waited for (the clients), and the kernel's share of this process's and
        of the agent's."""
        own = resource.getrusage(resource.RUSAGE_SELF)
        done = resource.getrusage(resource.RUSAGE_CHILDREN)
        agent, target = self.agent.cpu_times(), self.target.cpu_times()
        mine = own.ru_utime + own.ru_stime
        theirs = agent.user + agent.system
        return (
            mine,
            theirs,
            mine + theirs + target.user + target.system,
            done.ru_utime + done.ru_stime,
            own.ru_stime,
            agent.system,
        )


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _post(asked: dict[str, object], key: str) -> bytes:
    """A request to the service's (or the gateway's) :data:`BULK_PATH`; the connection
    closes after the answer."""
    body = json.dumps({"model": "bulk", **asked}).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (
        f"POST {BULK_PATH} HTTP/1.1\r\nHost: svc\r\nContent-Type: application/json\r\n"
        f"{auth}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def _client(
    cpu: _Cpu, port: int, data: bytes, times: int
) -> tuple[list[float], float, list[float], int]:
    """Latencies (s) of ``times`` requests by the client's process, its wall time, the CPU
    seconds (as :meth:`_Cpu.now`, all four's in the third), and the last answer's bytes."""
    before, wall = cpu.now(), time.perf_counter()
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CLIENT,
        str(port),
        str(times),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await client.communicate(data)
    wall = time.perf_counter() - wall
    spent = [after - was for was, after in zip(before, cpu.now(), strict=True)]
    assert client.returncode == 0, client.returncode
    answer = json.loads(out)
    assert answer["status"] == "HTTP/1.1 200 OK", answer["status"]
    spent[2] += spent[3]
    return answer["latencies"], wall, spent, answer["size"]


async def _curl(cpu: _Cpu, url: str, mib: int, key: str = "") -> tuple[float, float, list[float]]:
    """``mib`` MiB asked of ``url`` by curl, read to the end and dropped: bytes per second
    and wall seconds by curl, and CPU seconds (as :meth:`_Cpu.now`; curl's last)."""
    body = json.dumps({"model": "bulk", "bytes": mib * MiB})
    auth = ["-H", f"Authorization: Bearer {key}"] if key else []
    before = cpu.now()
    curl = await asyncio.create_subprocess_exec(
        *("curl", "-s", "-S", "--fail", "-o", "/dev/null", "-w", "%{size_download} %{time_total}"),
        *("-H", "Content-Type: application/json", *auth, "--data-binary", body, url),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await curl.communicate()
    spent = [after - was for was, after in zip(before, cpu.now(), strict=True)]
    assert curl.returncode == 0, curl.returncode
    size, wall = out.decode().split()
    assert int(size) == mib * MiB, size
    spent[2] += spent[3]
    return mib / float(wall), float(wall), spent


async def main(runs: int, requests: int, mib: int, tokens: int) -> dict[str, object]:
    """The figures of ``runs`` runs."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    target = await asyncio.create_subprocess_exec(
        sys.executable,
        _TARGET,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert target.stdout is not None
    assert target.stdin is not None
    port = int((await target.stdout.readline()).decode())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        identity = load_or_create(work / "identity")
        async with Coordinator(db_path=work / "c.db", state_dir=work / "state") as coordinator:
            coordinator.store.nodes.seen(identity.node_id, identity.public_key_b64, time.time())
            agent = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "support.tunnel_agent",
                tunnel_url(coordinator.url),
                str(work / "identity"),
                coordinator.key.key_id,
                crypto.b64encode(coordinator.key.public_key),
                str(port),
                env=env,
            )
            try:
                while identity.node_id not in coordinator.tunnels.connected():
                    await asyncio.sleep(0.05)
                cpu = _Cpu(agent.pid, target.pid)
                await coordinator.submit(identity.node_id, service_spec(["bulk"]), job_id="web")
                report(coordinator, identity.node_id, "web", "ready")
                key = new_key(coordinator, rate_per_min=10**9)
                ports = {"direct": (port, ""), "tunnel": (coordinator.gateway.port, key)}
                urls = {
                    name: f"http://127.0.0.1:{at}{BULK_PATH}" for name, (at, _) in ports.items()
                }
                for at, with_key in ports.values():  # warm up both paths
                    await _client(cpu, at, _post({"bytes": 100}, with_key), 50)
                figures: dict[str, dict[str, list[float]]] = {"direct": {}, "tunnel": {}}
                for _ in range(runs):
                    for name, (at, with_key) in ports.items():
                        small = _post({"bytes": 100}, with_key)
                        lat, wall, used, _ = await _client(cpu, at, small, requests)
                        row = figures[name]
                        row.setdefault("p50_ms", []).append(_percentile(lat, 0.5) * 1000)
                        row.setdefault("p99_ms", []).append(_percentile(lat, 0.99) * 1000)
                        row.setdefault("small_wall_s", []).append(wall)
                        row.setdefault("small_cpu_s", []).append(used[2])
                        rate, wall, used = await _curl(cpu, urls[name], mib, with_key)
                        row.setdefault("bulk_mib_s", []).append(rate)
                        row.setdefault("bulk_wall_s", []).append(wall)
                        row.setdefault("bulk_cpu_s", []).append(used[2])
                        row.setdefault("bulk_cpu_s_coordinator", []).append(used[0])
                        row.setdefault("bulk_cpu_s_agent", []).append(used[1])
                        row.setdefault("bulk_cpu_s_curl", []).append(used[3])
                        row.setdefault("bulk_sys_s_coordinator", []).append(used[4])
                        row.setdefault("bulk_sys_s_agent", []).append(used[5])
                        stream = _post({"tokens": tokens}, with_key)
                        (took,), _, used, size = await _client(cpu, at, stream, 1)
                        assert size > tokens * 12, size
                        row.setdefault("tokens_per_s", []).append(tokens / took)
                        row.setdefault("tokens_cpu_s", []).append(used[2])
            finally:
                agent.kill()
                await agent.wait()
    target.stdin.close()
    await target.wait()
    d, t = figures["direct"], figures["tunnel"]
    added = [b - a for a, b in zip(d["p50_ms"], t["p50_ms"], strict=True)]
    ratio = [b / a for a, b in zip(d["bulk_mib_s"], t["bulk_mib_s"], strict=True)]
    token_ratio = [b / a for a, b in zip(d["tokens_per_s"], t["tokens_per_s"], strict=True)]
    return {
        "runs": runs,
        "requests": requests,
        "bulk_mib": mib,
        "tokens": tokens,
        "direct": {key: spread(values) for key, values in d.items()},
        "tunnel": {key: spread(values) for key, values in t.items()},
        "added_p50_ms": spread(added),
        "bulk_tunnel_over_direct": spread(ratio),
        "tokens_tunnel_over_direct": spread(token_ratio),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=5000)
    args = parser.parse_args()
    reuse_freed_memory()  # as gpu-coordinator serve does
    results = asyncio.run(main(args.runs, args.requests, args.mib, args.tokens))
    text = json.dumps(results, indent=2)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "tunnel.json").write_text(text + "\n")
