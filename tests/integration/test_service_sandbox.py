"""A service's sandbox on the real engine: its own internal network, reached by the host
at the address the runner reports, reaching neither the outside nor the host."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from contextlib import aclosing
from typing import Any

import httpx
from support.runner import make_spec

from sandbox.events import Finished, Started
from sandbox.runner import Runner
from sandbox.service_net import HOST_RULE, network_name

SERVICE: dict[str, Any] = {"port": 8080, "models": ["tiny"], "lease_s": 60}
# busybox's httpd serves /www; the page says who answered.
SERVE = "mkdir -p /scratch/www && echo up > /scratch/www/health && httpd -f -p 8080 -h /scratch/www"


def _host_port() -> tuple[socket.socket, int]:
    """A TCP server of the host's on every address: what a service must not reach."""
    server = socket.create_server(("0.0.0.0", 0))
    return server, server.getsockname()[1]


def _exec(container: str, script: str) -> int:
    done = subprocess.run(
        ["docker", "exec", container, "sh", "-c", script],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.returncode


def _runtime_has_no_network() -> bool:
    runtimes = subprocess.run(
        ["docker", "info", "--format", "{{json .Runtimes.runsc}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return "--network=none" in runtimes


def _gateway(network: str) -> str:
    return subprocess.run(
        ["docker", "network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", network],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


async def test_a_service_is_reached_at_its_address_and_reaches_nothing(
    runner: Runner, test_image: str
) -> None:
    spec = make_spec(test_image, SERVE, kind="service", service=SERVICE)
    if runner.config.runtime == "runsc" and _runtime_has_no_network():
        # gVisor with its network stack off (as here): refused, not started unreachable.
        async with aclosing(runner.run("svc-1", spec, [])) as events:
            finished = [event async for event in events]
        assert isinstance(finished[-1], Finished)
        assert finished[-1].result.error_code == "service_runtime_unsupported"
        return
    server, port = _host_port()
    try:
        async with aclosing(runner.run("svc-1", spec, [])) as events:
            started = None
            async for event in events:
                if isinstance(event, Started):
                    started = event
                    break
            assert started is not None
            assert started.address, "a service is reported with its address"
            async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
                for _ in range(100):  # httpd binds a moment after the start
                    try:
                        answer = await client.get(f"http://{started.address}:8080/health")
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
            assert (answer.status_code, answer.text) == (200, "up\n")
            container = "gpu-agent-svc-1"
            gateway = _gateway(network_name("svc-1"))
            # The host's server on all addresses: the host's address on the bridge is
            # closed to the service; the outside has no route at all.
            assert _exec(container, f"nc -w 3 {gateway} {port} </dev/null") != 0
            assert _exec(container, "nc -w 3 1.1.1.1 53 </dev/null") != 0
            # What it can reach is itself.
            assert _exec(container, "nc -w 3 127.0.0.1 8080 </dev/null") == 0
            runner.cancel("svc-1")
            async for event in events:
                if isinstance(event, Finished):
                    assert event.result.reason == "cancelled"
    finally:
        server.close()
    # Its network went with it.
    listed = subprocess.run(
        ["docker", "network", "ls", "-q", "-f", f"name={network_name('svc-1')}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert listed.stdout.strip() == ""
    rule = subprocess.run(["iptables", "-C", "INPUT", *HOST_RULE], check=False)
    assert rule.returncode == 0
