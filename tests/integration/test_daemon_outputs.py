"""Outputs end to end: ``gpu-agent run`` (a child process) runs a job the in-process
coordinator offered, PUTs its outputs (to the coordinator's artifact store, to a real S3
API, to a store that stalls while the agent is killed -9), and ``gpu-coordinator submit
--wait --out DIR`` gets them back, checked against the receipt."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.daemon_loop import DUAL_A5000, Loop, job_spec, registered
from support.input_server import serve_input
from support.processes import free_port as _free_port
from support.s3 import running_s3
from support.store import running_store

from coordinator.server import Coordinator
from sandbox.docker_api import DockerClient

SCRIPT = (
    "mkdir -p /output/data; printf 'result %s\\n' $(seq 1 2000) > /output/result.txt;"
    " head -c 300000 /dev/zero | tr '\\0' 'b' > /output/data/b.bin"
)


def _spec(loop: Loop, tmp: Path) -> Path:
    spec: dict[str, Any] = job_spec(loop.image, SCRIPT) | {"outputs": ["result.txt", "data/b.bin"]}
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec))
    return path


async def _cli(loop: Loop, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "coordinator.cli", *args]
    argv += ["--state-dir", str(loop.workdir / "coordinator")]
    # In a thread: the coordinator shares this event loop and must serve the command.
    return await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=180, check=False
    )


def _receipt_outputs(loop: Loop, job_id: str) -> dict[str, str]:
    row = loop.job(job_id)
    assert row.result is not None
    return {o["path"]: o["sha256"] for o in row.result.receipt["outputs"]}


async def test_submit_wait_out_gets_the_outputs_and_their_digests_are_the_receipts(
    loop: Loop, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = await _cli(
        loop, "submit", str(_spec(loop, tmp_path)), "--node", loop.node_id,
        "--wait", "--timeout", "150", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + (loop.workdir / "agent.log").read_text()
    job_id = done.stdout.split()[0]
    assert loop.states(job_id) == ["accepted", "running", "uploading", "completed"]
    digests = _receipt_outputs(loop, job_id)
    for path in ("result.txt", "data/b.bin"):
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == digests[path]
    assert (out / "data/b.bin").read_bytes() == b"b" * 300000
    assert loop.c.jobs.artifacts is not None
    assert sorted(loop.c.jobs.artifacts.outputs(job_id)) == ["data/b.bin", "result.txt"]
    assert list((loop.workdir / "agent" / "spool").iterdir()) == []


async def test_an_output_given_a_presigned_url_goes_to_s3_the_rest_to_the_coordinator(
    loop: Loop, tmp_path: Path
) -> None:
    with running_s3() as s3:
        url = s3.presign_put("run/result.txt")
        done = await _cli(
            loop, "submit", str(_spec(loop, tmp_path)), "--node", loop.node_id,
            "--upload", f"result.txt={url}", "--wait", "--timeout", "150",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        job_id = done.stdout.split()[0]
        digests = _receipt_outputs(loop, job_id)
        assert s3.sha256("run/result.txt") == digests["result.txt"]
        assert loop.c.jobs.artifacts is not None
        assert sorted(loop.c.jobs.artifacts.outputs(job_id)) == ["data/b.bin"]


async def test_an_agent_killed_mid_upload_redoes_it_at_restart_and_reports_the_job_once(
    loop: Loop, tmp_path: Path
) -> None:
    with running_store() as store:
        store.stall = True
        submitted = asyncio.create_task(
            _cli(
                loop,
                "submit",
                str(_spec(loop, tmp_path)),
                "--node",
                loop.node_id,
                "--upload",
                f"result.txt={store.url}/r",
                "--wait",
                "--timeout",
                "170",
            )
        )
        await loop.until(store.stalled.is_set, "the upload to reach the store", timeout=120)
        assert loop.agent is not None
        loop.agent.kill()
        await loop.exited()
        [job] = loop.c.jobs.recent()
        assert loop.states(job.job_id) == ["accepted", "running", "uploading"]
        store.stall = False
        store.release.set()
        loop.start_agent()
        done = await submitted
        assert done.returncode == 0, done.stderr + (loop.workdir / "agent.log").read_text()
        assert loop.states(job.job_id) == ["accepted", "running", "uploading", "completed"]
        assert len(loop.bodies("job_result", job.job_id)) == 1
        digests = _receipt_outputs(loop, job.job_id)
        assert store.objects == {"/r": digests["result.txt"]}
        assert list((loop.workdir / "agent" / "spool").iterdir()) == []


async def test_a_coordinator_down_when_the_outputs_are_ready_gets_them_after_its_restart(
    tmp_path: Path, library_for: Callable[[Path], Path], test_image_id: str, docker_engine: str
) -> None:
    world = _FixedArtifacts(
        tmp_path, library_for(DUAL_A5000), test_image_id, DockerClient(docker_engine)
    )
    await world.start_coordinator()
    world.start_agent()
    try:
        await world.ready()
        spec = job_spec(world.image, "sleep 1; echo done > /output/result.txt")
        job_id = await world.c.submit(world.node_id, spec | {"outputs": ["result.txt"]})
        await world.until(lambda: "running" in world.states(job_id), "the job to run")
        await world.stop_coordinator()  # its artifact store is gone while the job ends
        log = world.workdir / "agent.log"
        # The agent's PUTs are refused, and retried (it says so), before the store is back.
        await world.until(lambda: b"attempt 2:" in log.read_bytes(), "a retried PUT", timeout=120)
        await world.start_coordinator()
        await world.until(lambda: world.job(job_id).final, "the job to end", timeout=150)
        assert world.job(job_id).state == "completed"
        assert world.states(job_id) == ["accepted", "running", "uploading", "completed"]
        assert world.c.jobs.artifacts is not None
        stored = world.c.jobs.artifacts.outputs(job_id)
        assert stored["result.txt"].sha256 == _receipt_outputs(world, job_id)["result.txt"]
    finally:
        if world.agent is not None and world.agent.poll() is None:
            world.agent.send_signal(signal.SIGTERM)
            await world.exited()
        if world.coordinator is not None:
            await world.stop_coordinator()


class _FixedArtifacts(Loop):
    """A loop whose coordinator keeps its artifact port across restarts (the signed URLs
    name it), as ``serve --artifacts-port`` does."""

    artifacts_port: int = 0

    async def start_coordinator(self) -> Coordinator:
        if not self.artifacts_port:
            self.artifacts_port = _free_port()
        self.coordinator = Coordinator(
            db_path=self.workdir / "coordinator.db",
            state_dir=self.workdir / "coordinator",
            port=self.port,
            artifacts_port=self.artifacts_port,
        )
        await self.coordinator.start()
        return self.coordinator


async def test_a_real_job_a_tag_pulled_an_input_fetched_its_outputs_uploaded_and_fetched(
    tmp_path: Path, library_for: Callable[[Path], Path], docker_engine: str
) -> None:
    """The issue's end to end: a spec naming a tag in a local registry and an input by URL,
    submitted with ``gpu-coordinator submit --wait --out``: pinned, pulled, fetched, run,
    uploaded, and the outputs back on the submitter's disk, matching the receipt."""
    weights = os.urandom(1 << 20)
    with serve_input(weights) as server:
        policy = 'allowed_input_hosts = ["127.0.0.1"]\n'
        async with registered(tmp_path, library_for, extra_policy=policy) as it:
            loop = it.loop
            await loop.ready()
            spec = job_spec(it.tag, "sha256sum /input/weights.bin > /output/sum.txt")
            spec |= {
                "inputs": [
                    {
                        "path": "weights.bin",
                        "url": server.url("/file"),
                        "sha256": server.sha256,
                        "size_bytes": len(weights),
                    }
                ],
                "outputs": ["sum.txt"],
            }
            (tmp_path / "job.json").write_text(json.dumps(spec))
            out = tmp_path / "out"
            argv = ["submit", str(tmp_path / "job.json"), "--node", loop.node_id]
            done = await _cli(loop, *argv, "--wait", "--timeout", "150", "--out", str(out))
            assert done.returncode == 0, done.stderr + (tmp_path / "agent.log").read_text()
            job_id = done.stdout.split()[0]
            states = loop.states(job_id)
            assert states[:3] == ["accepted", "fetching", "pulling"]
            assert states[-2:] == ["uploading", "completed"]
            assert loop.job(job_id).spec["image"] == it.pinned
            text = (out / "sum.txt").read_text()
            assert text.split()[0] == server.sha256
            digest = hashlib.sha256(text.encode()).hexdigest()
            assert _receipt_outputs(loop, job_id) == {"sum.txt": digest}
