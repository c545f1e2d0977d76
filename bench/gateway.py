"""The gateway's overhead: an OpenAI-style server reached through the coordinator's gateway
and a node's tunnel against the same server reached straight, side by side in one run.

Three processes on loopback: this one (the reference coordinator with its gateway, in
process, and the client), the agent's :class:`agent.services.tunnel.ServiceTunnel`
(tests/support/tunnel_agent.py) and the server (tests/support/fake_openai.py, which keeps
its connections alive after a plain answer, as llama.cpp's server does). The client is
httpx, on kept-alive connections to the gateway and to the server. Each run measures,
both ways:

- latency: ``--requests`` small non-streamed completions (one token) one after another;
  p50 and p99 (the issue's goal: at most 2 ms added at p50);
- tokens: a streamed chat of ``--tokens`` events, each written on its own as a model server
  does, read event by event; time to the first event, and tokens/s after it (the stream's
  pace, apart from the request's setup; goal: at least 0.95x straight), and with
  ``--llama`` the tokens/s the server reports for itself (the model's own pace: on a
  machine whose cores the relay shares, what the relay's CPU takes from the model);

with wall time and the CPU time (user + system) of all three processes beside it.
With ``--llama`` the server is the real llama-server in its container instead (as
bench/llama_direct.py runs it: the tiny model, one thread, an internal network), and the
tokens are the model's (end-of-sequence forbidden): the figures a client of a real model
sees. The model runs on the last CPU alone and everything else on the others, as on a
node whose model computes on its GPU (the relays take nothing from it). Run with
``python bench/gateway.py --runs N [--llama]``; min/median/max over runs printed and
written to ``bench/results/gateway.json`` (``gateway_llama.json``). Nothing
asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT / "tests")

from support.gateway import report, service_spec  # noqa: E402
from support.llama import llama_server_image  # noqa: E402
from support.llama_server import MODEL_ALIAS, PORT, running_llama_server  # noqa: E402
from support.stats import spread  # noqa: E402
from support.tiny_model import tiny_model  # noqa: E402

from agent.link.identity import load_or_create  # noqa: E402
from agent.protocol import crypto  # noqa: E402
from agent.services.tunnel import tunnel_url  # noqa: E402
from coordinator.server import Coordinator  # noqa: E402

_SERVER = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from support.fake_openai import FakeOpenAI

async def main():
    server = FakeOpenAI("bench", keep_alive=True)
    await server.start()
    print(server.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop()

asyncio.run(main())
"""


class _Cpu:
    """CPU seconds (user + system) of the three processes together."""

    def __init__(self, *pids: int) -> None:
        self.others = [psutil.Process(pid) for pid in pids]

    def now(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        times = [p.cpu_times() for p in self.others]
        return own.ru_utime + own.ru_stime + sum(t.user + t.system for t in times)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


SOCKET = "/var/run/docker.sock"
#: llama-server: the end-of-sequence token forbidden, greedy: every stream is as long.
_LLAMA = {"logit_bias": {"2": -100}, "temperature": 0}


async def _small(client: httpx.AsyncClient, base: str, model: str) -> int:
    body = {"model": model, "prompt": "hi", "max_tokens": 1, **_LLAMA}
    answer = await client.post(f"{base}/completions", json=body)
    answer.raise_for_status()
    return len(answer.content)


class _Streamed:
    """What a stream's client saw: the tokens reported, the first and last event's time."""

    def __init__(self) -> None:
        self.tokens = 0
        self.start = 0.0
        self.first = 0.0
        self.last = 0.0
        self.server_rate = 0.0
        """The tokens/s the server reports for itself (llama.cpp's ``timings``)."""


async def _stream(
    client: httpx.AsyncClient, base: str, model: str, tokens: int, seen: _Streamed
) -> int:
    """A streamed chat, read event by event: the tokens it reports in its last event."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    body |= {"max_tokens": tokens, "stream_options": {"include_usage": True}, **_LLAMA}
    seen.start, seen.first = time.perf_counter(), 0.0
    async with client.stream("POST", f"{base}/chat/completions", json=body) as answer:
        async for line in answer.aiter_lines():
            if not line.startswith("data: {"):
                continue
            seen.last = time.perf_counter()
            seen.first = seen.first or seen.last
            if '"usage":{' in line.replace(" ", ""):
                last = json.loads(line[6:])
                seen.tokens = last["usage"]["completion_tokens"]
                seen.server_rate = last.get("timings", {}).get("predicted_per_second", 0.0)
    return seen.tokens


async def _timed(
    cpu: _Cpu, call: Callable[[], Awaitable[int]], times: int
) -> tuple[list[float], float, float, int]:
    """Latencies (s), wall and CPU seconds for ``times`` calls, and the last one's result."""
    latencies = []
    wall, used = time.perf_counter(), cpu.now()
    result = 0
    for _ in range(times):
        start = time.perf_counter()
        result = await call()
        latencies.append(time.perf_counter() - start)
    return latencies, time.perf_counter() - wall, cpu.now() - used, result


async def main(runs: int, requests: int, tokens: int, llama: bool) -> dict[str, object]:
    """The figures of ``runs`` runs against the fake server or llama-server."""
    if llama:
        # A model on a GPU takes no CPU from the relays; on this CPU-only machine the model
        # gets the last core to itself and everything else (client, coordinator, agent) the
        # others, for the direct run and the gateway run alike.
        cores = sorted(os.sched_getaffinity(0))
        model_cpu, others = (str(cores[-1]), set(cores[:-1])) if len(cores) > 1 else ("", set())
        if others:
            os.sched_setaffinity(0, others)  # the agent, started later, inherits it
        image = llama_server_image(SOCKET)
        with running_llama_server(SOCKET, image, tiny_model(), cpus=model_cpu) as server:
            pid = int(_docker_pid(server.container))
            return await _measure(
                server.ip, PORT, pid, MODEL_ALIAS, runs=runs, requests=requests, tokens=tokens
            )
    fake = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SERVER,
        str(ROOT / "tests"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert fake.stdout is not None
    assert fake.stdin is not None
    try:
        port = int((await fake.stdout.readline()).decode())
        return await _measure(
            "127.0.0.1", port, fake.pid, "tiny", runs=runs, requests=requests, tokens=tokens
        )
    finally:
        fake.stdin.close()
        await fake.wait()


def _docker_pid(container: str) -> str:
    done = subprocess.run(
        ["docker", "--host", f"unix://{SOCKET}", "inspect", "-f", "{{.State.Pid}}", container],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


async def _measure(
    host: str, port: int, server_pid: int, model: str, *, runs: int, requests: int, tokens: int
) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        identity = load_or_create(work / "identity")
        async with Coordinator(db_path=work / "c.db", state_dir=work / "state") as coordinator:
            node = identity.node_id
            coordinator.store.nodes.seen(node, identity.public_key_b64, time.time())
            agent = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "support.tunnel_agent",
                tunnel_url(coordinator.url),
                str(work / "identity"),
                coordinator.key.key_id,
                crypto.b64encode(coordinator.key.public_key),
                f"{host}:{port}",
                env=env,
            )
            try:
                while node not in coordinator.tunnels.connected():
                    await asyncio.sleep(0.05)
                # The tunnel agent serves the target "web": the job is named so.
                await coordinator.submit(node, service_spec([model]), job_id="web")
                report(coordinator, node, "web", "ready")
                key = coordinator.store.api_keys.create("bench", 1_000_000, time.time())[1]
                cpu = _Cpu(agent.pid, server_pid)
                bases = {
                    "direct": f"http://{host}:{port}/v1",
                    "gateway": coordinator.gateway_url,
                }
                headers = {"authorization": f"Bearer {key}"}
                async with httpx.AsyncClient(
                    trust_env=False, headers=headers, timeout=60
                ) as client:
                    for base in bases.values():  # warm up both paths
                        await _timed(cpu, functools.partial(_small, client, base, model), 50)
                    figures: dict[str, dict[str, list[float]]] = {"direct": {}, "gateway": {}}
                    for _ in range(runs):
                        for name, base in bases.items():
                            row = figures[name]
                            small = functools.partial(_small, client, base, model)
                            lat, wall, used, _ = await _timed(cpu, small, requests)
                            row.setdefault("p50_ms", []).append(_percentile(lat, 0.5) * 1000)
                            row.setdefault("p99_ms", []).append(_percentile(lat, 0.99) * 1000)
                            row.setdefault("small_wall_s", []).append(wall)
                            row.setdefault("small_cpu_s", []).append(used)
                            seen = _Streamed()
                            stream = functools.partial(_stream, client, base, model, tokens, seen)
                            _, wall, used, got = await _timed(cpu, stream, 1)
                            assert got == tokens, got
                            # After the first event: the stream's pace, not the request's
                            # setup (its latency is the figure above; ttft beside).
                            rate = (tokens - 1) / (seen.last - seen.first)
                            row.setdefault("tokens_per_s", []).append(rate)
                            if seen.server_rate:
                                # The model's own pace: a relay that costs CPU slows it on
                                # a machine whose cores it shares.
                                row.setdefault("server_tokens_per_s", []).append(seen.server_rate)
                            ttft = (seen.first - seen.start) * 1000
                            row.setdefault("ttft_ms", []).append(ttft)
                            row.setdefault("tokens_wall_s", []).append(wall)
                            row.setdefault("tokens_cpu_s", []).append(used)
            finally:
                agent.kill()
                await agent.wait()
    d, g = figures["direct"], figures["gateway"]
    added = [b - a for a, b in zip(d["p50_ms"], g["p50_ms"], strict=True)]
    ratio = [b / a for a, b in zip(d["tokens_per_s"], g["tokens_per_s"], strict=True)]
    server = [
        b / a
        for a, b in zip(
            d.get("server_tokens_per_s", []), g.get("server_tokens_per_s", []), strict=True
        )
    ]
    return {
        "runs": runs,
        "requests": requests,
        "tokens": tokens,
        "direct": {key: spread(values) for key, values in d.items()},
        "gateway": {key: spread(values) for key, values in g.items()},
        "added_p50_ms": spread(added),
        "tokens_gateway_over_direct": spread(ratio),
        **({"server_tokens_gateway_over_direct": spread(server)} if server else {}),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=None, help="5000; 512 with --llama")
    parser.add_argument("--llama", action="store_true", help="the real llama-server")
    args = parser.parse_args()
    tokens = args.tokens or (512 if args.llama else 5000)
    results = asyncio.run(main(args.runs, args.requests, tokens, args.llama))
    results["server"] = "llama-server" if args.llama else "fake_openai"
    text = json.dumps(results, indent=2)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    name = "gateway_llama.json" if args.llama else "gateway.json"
    (out / name).write_text(text + "\n")
