"""A served model's start and its load: `python bench/service_start.py [--runs N]`.

The whole loop on this machine: the reference coordinator (in this process) with its
gateway, one ``gpu-agent run`` daemon (a child, two recorded GPUs through the fake NVML),
and llama.cpp's ``llama-server`` (the cached test image) serving the tiny model, which the
agent fetches by URL from a local server once and then finds in its input cache.

- deploy to first token: ``Deployments.deploy`` of one replica, then a streamed completion
  through the gateway asked until one answers; seconds from the deploy to its first token
  event, per run (the image is on the node; the first run also fetches the model, the
  others find it cached: both shown). Undeployed after each run.
- 64 concurrent streams on the one node: time to first token of 64 streamed completions
  started at once, p50 and p99, through the gateway (gateway -> tunnel -> agent ->
  container) against straight to the container's address on its network (the host
  reaches it), side by side in the same run.

Min/median/max over runs printed and written to ``bench/results/service_start.json``.
Nothing asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT / "tests")

from support.daemon_loop import DUAL_A5000, Loop  # noqa: E402
from support.fakenvml import build  # noqa: E402
from support.gateway import new_key  # noqa: E402
from support.input_server import InputServer, serve_input  # noqa: E402
from support.llama import llama_server_image  # noqa: E402
from support.llama_server import MODEL_ALIAS, service_spec  # noqa: E402
from support.stats import spread  # noqa: E402
from support.tiny_model import tiny_model  # noqa: E402

from sandbox.docker_api import DockerClient  # noqa: E402

MODEL = MODEL_ALIAS
STREAMS = 64
_SOCKET = "/var/run/docker.sock"


def _spec(image: str, model: InputServer, size: int) -> dict[str, Any]:
    return service_spec(
        image,
        model.url("/file"),
        model.sha256,
        size,
        parallel=8,
        ctx_size=4096,
        max_streams=STREAMS,
    )


async def _first_token(client: httpx.AsyncClient, url: str, key: str | None) -> float | None:
    """Seconds to the first token event of a streamed completion; None if not served."""
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 16, "stream": True}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    start = time.perf_counter()
    async with client.stream("POST", url, json=body, headers=headers) as answer:
        if answer.status_code != 200:
            await answer.aread()
            return None
        async for line in answer.aiter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - start
    return None


async def _deploy_to_token(loop: Loop, spec: dict[str, Any], key: str, name: str) -> float:
    url = loop.c.gateway_url + "/completions"
    start = time.perf_counter()
    await loop.c.deployments.deploy(name, spec, 1)
    async with httpx.AsyncClient(timeout=30) as client:
        while await _first_token(client, url, key) is None:
            await asyncio.sleep(0.02)
    took = time.perf_counter() - start
    for job_id in await loop.c.deployments.undeploy(name):
        await loop.until(partial(_ended, loop, job_id), "the replica to stop")
    return took


def _ready(loop: Loop) -> list[str]:
    return [row.job_id for row in loop.c.store.jobs.recent(limit=50) if row.state == "ready"]


def _ended(loop: Loop, job_id: str) -> bool:
    return loop.job(job_id).final


def _container_address(job_id: str) -> str:
    template = f'{{{{(index .NetworkSettings.Networks "gpu-agent-svc-{job_id}").IPAddress}}}}'
    return subprocess.run(
        ["docker", "inspect", "-f", template, f"gpu-agent-{job_id}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


async def _concurrent(url: str, key: str | None) -> tuple[float, float]:
    """p50 and p99 seconds to the first token of STREAMS streams started at once."""
    limits = httpx.Limits(max_connections=STREAMS, max_keepalive_connections=STREAMS)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        times = await asyncio.gather(*(_first_token(client, url, key) for _ in range(STREAMS)))
    served = sorted(t for t in times if t is not None)
    assert len(served) == STREAMS, f"{STREAMS - len(served)} stream(s) not served"
    return statistics.median(served), served[int(0.99 * (len(served) - 1))]


async def main(runs: int) -> dict[str, Any]:
    image = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", llama_server_image(_SOCKET)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    model_file = tiny_model()
    with tempfile.TemporaryDirectory() as tmp, serve_input(model_file.read_bytes()) as model:
        work = Path(tmp)
        library = build.build_library(build.parse_capture(DUAL_A5000), work / "nvml")
        loop = Loop(work / "loop", library, image, DockerClient())
        loop.workdir.mkdir()
        loop.extra_policy = 'allowed_input_hosts = ["127.0.0.1"]\n'
        await loop.start_coordinator()
        try:
            loop.start_agent()
            await loop.ready()
            key = new_key(loop.c, rate_per_min=1_000_000)
            spec = _spec(image, model, model_file.stat().st_size)
            starts = [await _deploy_to_token(loop, spec, key, f"b{i}") for i in range(runs + 1)]
            await loop.c.deployments.deploy("load", spec, 1)
            await loop.until(lambda: bool(_ready(loop)), "the replica", 120)
            [job_id] = _ready(loop)
            direct_url = f"http://{_container_address(job_id)}:8080/v1/completions"
            gateway_url = loop.c.gateway_url + "/completions"
            through, direct = [], []
            for _ in range(runs):
                through.append(await _concurrent(gateway_url, key))
                direct.append(await _concurrent(direct_url, None))
        finally:
            if loop.agent is not None and loop.agent.poll() is None:
                loop.agent.terminate()
                await loop.exited()
            await loop.stop_coordinator()
    return {
        "deploy_to_first_token_s_model_fetched": round(starts[0], 4),
        "deploy_to_first_token_s_model_cached": spread(starts[1:]),
        "streams": STREAMS,
        "ttft_p50_s": {
            "gateway": spread([t[0] for t in through]),
            "direct": spread([d[0] for d in direct]),
        },
        "ttft_p99_s": {
            "gateway": spread([t[1] for t in through]),
            "direct": spread([d[1] for d in direct]),
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    figures = asyncio.run(main(parser.parse_args().runs))
    text = json.dumps(figures, indent=2)
    print(text)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "service_start.json").write_text(text + "\n")
