"""A real llama-server in a container, serving a model file, on a network with no way out.

The container sits on a Docker network created ``--internal`` (no route off the host),
publishes no port, and is reached at its own address on that network: how the agent will
reach a service. Its root file system is read-only and the model is mounted read-only.

``--internal`` cuts the route off the host, not the way to the host itself: a host service
listening on 0.0.0.0 answers the container at the network's gateway address (or any of the
host's addresses). Only 127.0.0.1 stays out of reach; the agent has to close the rest.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MODEL_ALIAS", "PORT", "LlamaServer", "running_llama_server", "service_spec"]

PORT = 8080
MODEL_ALIAS = "tiny-llama"
_MODEL_IN_CONTAINER = "/models/model.gguf"

#: /health is polled this many times, ``_HEALTH_PAUSE_S`` apart (each poll waiting at most
#: ``_HEALTH_TIMEOUT_S``), before giving up: loading a few-MB model takes well under a
#: second, the bound is for a loaded machine.
_HEALTH_TRIES = 600
_HEALTH_PAUSE_S = 0.1
_HEALTH_TIMEOUT_S = 2


@dataclass(frozen=True)
class LlamaServer:
    """A started server: its container, its network, where it answers."""

    container: str
    network: str
    ip: str
    port: int = PORT

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API's root, for the ``openai`` client."""
        return f"http://{self.ip}:{self.port}/v1"

    @property
    def url(self) -> str:
        """The server's root (``/health``, ``/props``)."""
        return f"http://{self.ip}:{self.port}"


def _docker(socket: str, *args: str) -> str:
    done = subprocess.run(
        ["docker", "--host", f"unix://{socket}", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"docker {args[0]} {args[1]}: {done.stderr.strip()}")
    return done.stdout.strip()


def _health(url: str) -> str | None:
    """The server's /health status, or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=_HEALTH_TIMEOUT_S) as response:
            return str(json.load(response).get("status"))
    except urllib.error.HTTPError as error:  # 503 while the model loads
        error.close()
        return None
    except OSError:
        return None


@contextmanager
def running_llama_server(
    socket: str,
    image: str,
    model: Path,
    args: Sequence[str] = (),
    *,
    threads: int = 1,
    parallel: int = 2,
    cpus: str = "",
) -> Iterator[LlamaServer]:
    """Start llama-server on ``model`` (extra server ``args`` appended; ``cpus``: the only
    CPUs it may run on, as ``docker run --cpuset-cpus``); wait until /health says ok;
    remove the container and its network after.

    One thread by default: on a small shared machine, ggml's threads spin waiting on each
    other whenever one is preempted, and a 4 MB model gains nothing from a second one.
    """
    name = f"gpu-agent-test-llama-{uuid.uuid4().hex[:12]}"
    _docker(socket, "network", "create", "--internal", "--label", "gpu-agent-test=llama", name)
    try:
        _docker(
            socket, "run", "--detach", "--name", name, "--network", name,
            "--label", "gpu-agent-test=llama", "--read-only", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "--memory", "1g", "--pids-limit", "256",
            *(["--cpuset-cpus", cpus] if cpus else []),
            "--mount", f"type=bind,source={model.resolve()},target={_MODEL_IN_CONTAINER},readonly",
            image, "--model", _MODEL_IN_CONTAINER, "--alias", MODEL_ALIAS,
            "--host", "0.0.0.0", "--port", str(PORT),
            "--threads", str(threads), "--parallel", str(parallel), "--ctx-size", "2048",
            *args,
        )  # fmt: skip
        try:
            template = f'{{{{(index .NetworkSettings.Networks "{name}").IPAddress}}}}'
            server = LlamaServer(name, name, _docker(socket, "inspect", "-f", template, name))
            _wait_ready(socket, server)
            yield server
        finally:
            _docker(socket, "rm", "--force", name)
    finally:
        _docker(socket, "network", "rm", name)


def _wait_ready(socket: str, server: LlamaServer) -> None:
    for _ in range(_HEALTH_TRIES):
        if _health(server.url) == "ok":
            return
        if _docker(socket, "inspect", "-f", "{{.State.Running}}", server.container) != "true":
            break
        time.sleep(_HEALTH_PAUSE_S)
    logs = subprocess.run(
        ["docker", "--host", f"unix://{socket}", "logs", "--tail", "30", server.container],
        capture_output=True,
        text=True,
        check=False,
    )
    raise RuntimeError(f"llama-server never became ready:\n{logs.stdout}{logs.stderr}")


def service_spec(
    image: str,
    model_url: str,
    model_sha256: str,
    model_size: int,
    *,
    parallel: int = 2,
    ctx_size: int = 2048,
    max_streams: int = 64,
) -> dict[str, Any]:
    """The spec of llama-server as a service (``kind = "service"``) on a model the agent
    fetches by URL into ``/input/model.gguf``: one thread, ``parallel`` slots."""
    return {
        "kind": "service",
        "image": image,
        "args": [
            *("--model", "/input/model.gguf", "--alias", MODEL_ALIAS, "--host", "0.0.0.0"),
            *("--port", str(PORT), "--threads", "1", "--parallel", str(parallel)),
            *("--ctx-size", str(ctx_size)),
        ],
        "resources": {"memory_bytes": "2GiB", "pids": 256},
        "grace_s": 2,
        "inputs": [
            {
                "path": "model.gguf",
                "url": model_url,
                "sha256": model_sha256,
                "size_bytes": model_size,
            }
        ],
        "service": {
            "port": PORT,
            "models": [MODEL_ALIAS],
            "readiness": {"path": "/health", "interval_s": 0.1},
            "start_allowance_s": 120,
            "max_streams": max_streams,
        },
    }
