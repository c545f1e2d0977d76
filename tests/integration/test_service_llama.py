"""A real model server as a service, end to end: the coordinator offers llama.cpp's
``llama-server`` with a real (tiny) model given by URL; the agent daemon fetches the model,
runs the server in its sandbox on a network of its own, probes it ready; a completion
request reaches it through the node's tunnel and real tokens come back."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.daemon_loop import DUAL_A5000, Loop
from support.input_server import InputServer, serve_input
from support.llama_server import MODEL_ALIAS, service_spec

from coordinator.server import Coordinator
from sandbox.docker_api import DockerClient

MODEL = MODEL_ALIAS


def _image_id(tag: str) -> str:
    return subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", tag],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def model_server(tiny_model_file: Path) -> Any:
    with serve_input(tiny_model_file.read_bytes()) as running:
        yield running


@pytest.fixture
async def llama_loop(
    tmp_path: Path,
    library_for: Callable[[Path], Path],
    llama_image: str,
    docker_engine: str,
) -> AsyncIterator[Loop]:
    image = _image_id(llama_image)
    world = Loop(tmp_path, library_for(DUAL_A5000), image, DockerClient(docker_engine))
    world.extra_policy = 'allowed_input_hosts = ["127.0.0.1"]\n'
    await world.start_coordinator()
    world.start_agent()
    await world.ready()
    yield world
    if world.agent is not None and world.agent.poll() is None:
        world.agent.send_signal(signal.SIGTERM)
        await world.exited()
    await world.stop_coordinator()


async def _post(coordinator: Coordinator, node_id: str, job_id: str, body: bytes) -> bytes:
    stream = coordinator.tunnels.open(node_id, job_id)
    async with stream:
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: service\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        await stream.write(head.encode() + body)
        answer = b""
        while chunk := await stream.read():
            answer += chunk
    return answer


async def test_llama_server_serves_real_tokens_through_the_tunnel(
    llama_loop: Loop, model_server: InputServer, tiny_model_file: Path
) -> None:
    loop = llama_loop
    size = tiny_model_file.stat().st_size
    spec = service_spec(loop.image, model_server.url("/file"), model_server.sha256, size)
    job_id = await loop.c.submit(loop.node_id, spec)
    await loop.until(lambda: "ready" in loop.states(job_id), "llama-server to be ready", 180)
    await loop.until(lambda: loop.node_id in loop.c.tunnels.connected(), "the tunnel")
    request = {"model": MODEL, "prompt": "hello", "max_tokens": 8, "temperature": 0}
    answer = await _post(loop.c, loop.node_id, job_id, msgspec.json.encode(request))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0].endswith(b" 200 OK"), answer[:300]
    completion = msgspec.json.decode(body)
    assert completion["model"] == MODEL
    assert completion["usage"]["completion_tokens"] == 8
    assert completion["choices"][0]["text"]
    await loop.c.cancel(job_id)
    await loop.until(lambda: loop.job(job_id).final, "the service to stop")
    assert (loop.job(job_id).state, loop.job(job_id).code) == ("stopped", "cancelled")
