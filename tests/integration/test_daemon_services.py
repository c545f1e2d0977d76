"""A service through the whole loop: the coordinator offers it, the agent daemon runs and
probes it, and the coordinator's requests reach it through the node's tunnel."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from support.daemon_loop import Loop, job_spec

from coordinator.errors import StreamError
from coordinator.server import Coordinator

SERVE = (
    "mkdir -p /scratch/www && echo up > /scratch/www/health"
    " && exec httpd -f -p 8080 -h /scratch/www"
)
SERVICE = {
    "port": 8080,
    "models": ["tiny"],
    "readiness": {"interval_s": 0.2},
    "liveness": {"interval_s": 0.5},
}


async def _get(coordinator: Coordinator, node_id: str, target: str, path: str) -> bytes:
    """One HTTP/1.0 GET through the node's tunnel: the whole answer."""
    stream = coordinator.tunnels.open(node_id, target)
    async with stream:
        await stream.write(f"GET {path} HTTP/1.0\r\nHost: service\r\n\r\n".encode())
        await stream.write_eof()
        answer = b""
        while chunk := await stream.read():
            answer += chunk
    return answer


async def test_a_ready_service_answers_through_the_tunnel_and_a_drain_stops_it(
    loop: Loop,
) -> None:
    node_id = loop.node_id
    spec = {**job_spec(loop.image, SERVE), "kind": "service", "service": SERVICE}
    job_id = await loop.c.submit(node_id, spec)
    await loop.until(lambda: "ready" in loop.states(job_id), "the service to be ready")
    await loop.until(lambda: node_id in loop.c.tunnels.connected(), "the node's tunnel")
    answer = await _get(loop.c, node_id, job_id, "/health")
    assert answer.split(b"\r\n", 1)[0].endswith(b" 200 OK"), answer
    assert answer.endswith(b"\r\n\r\nup\n"), answer
    # A target the node does not serve is reset with a code, not left hanging.
    with pytest.raises(StreamError) as unknown:
        await _get(loop.c, node_id, "job-none", "/health")
    assert unknown.value.code == "unknown_target"

    socket_path = loop.workdir / "run" / "agent.sock"
    argv = [sys.executable, "-m", "agent.cli", "pause", "--drain", "--socket", str(socket_path)]
    drained = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=120, check=False
    )
    assert drained.returncode == 0, drained.stderr
    await loop.until(lambda: loop.job(job_id).final, "the service to end")
    statuses = [(b["state"], b["code"]) for b in loop.bodies("job_status", job_id)]
    assert statuses[-2:] == [("unhealthy", "draining"), ("stopped", "drained")]
    assert loop.job(job_id).result is not None  # its receipt came, and verified
