"""Inputs by URL end to end on the real engine: fetched before the job, mounted read-only."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.engine import require_runtime
from support.input_server import InputServer, serve_input

from agent.inputs.cache import InputCache
from agent.inputs.fetch import FetchLimits
from agent.inputs.sink import BUFFER_BYTES
from agent.inputs.stage import Inputs
from agent.jobs import manager as manager_module
from agent.jobs.manager import JobManager
from agent.jobs.node import NodeState
from agent.jobs.scheduler import Scheduler
from agent.link.identity import Identity, load_or_create
from agent.link.outbox import Outbox
from agent.protocol import crypto, dsse
from agent.protocol.bodies import EnvelopeBody, JobCancelBody, JobOfferBody
from agent.protocol.jobs import Offer, sign_offer
from agent.protocol.messages import JobCancel, JobOffer, wrap
from sandbox.docker_api import DockerClient
from sandbox.events import Finished, JobResult, LogChunk
from sandbox.policy import Policy
from sandbox.runner import Runner, RunnerConfig
from sandbox.spec import load_spec

DATA = os.urandom(1 << 20)
SHA = hashlib.sha256(DATA).hexdigest()
COORDINATOR = crypto.generate_private_key()
COORDINATOR_PUB = crypto.public_key_bytes(COORDINATOR)
COORDINATOR_ID = crypto.key_id(COORDINATOR_PUB)
_seqs = itertools.count(1)
# Every way a job could try to change its input; each must fail.
_TAMPER = (
    "sha256sum /input/model.bin; "
    "echo x >> /input/model.bin || echo append-refused; "
    "rm -f /input/model.bin || echo rm-refused; "
    "chmod 666 /input/model.bin || echo chmod-refused; "
    "mv /input/model.bin /input/other || echo mv-refused; "
    "touch /input/new || echo touch-refused; "
    "sha256sum /input/model.bin"
)


@pytest.fixture
def server() -> Iterator[InputServer]:
    with serve_input(DATA) as running:
        yield running


@dataclass
class World:
    manager: JobManager
    outbox: Outbox
    identity: Identity
    cache: InputCache
    image: str
    woken: asyncio.Event
    """Set each time the manager queues messages for the coordinator."""

    def messages(self, job_id: str) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for entry in self.outbox.pending(0, 10_000):
            body = msgspec.json.decode(entry.body)
            if body.get("job_id") == job_id:
                out.append((entry.kind, body))
        return out

    def states(self, job_id: str) -> list[str]:
        return [b["state"] for kind, b in self.messages(job_id) if kind == "job_status"]

    def log(self, job_id: str) -> str:
        return "".join(b["data"] for kind, b in self.messages(job_id) if kind == "job_log")

    def receipt(self, job_id: str) -> dict[str, Any]:
        [body] = [b for kind, b in self.messages(job_id) if kind == "job_result"]
        envelope = msgspec.convert(body["receipt"], dsse.Envelope)
        trusted = {self.identity.key_id: self.identity.public_key}
        return dsse.verify_receipt(envelope, trusted, self.identity.node_id)

    async def offer(self, job_id: str, spec: dict[str, Any]) -> None:
        now = time.time()
        offer = Offer(
            job_id=job_id,
            node_id=self.identity.node_id,
            spec=spec,
            issued_at=now,
            expires_at=now + 600,
        )
        envelope = sign_offer(offer, COORDINATOR, COORDINATOR_ID)
        body = JobOfferBody(
            job_id=job_id, offer=msgspec.convert(envelope, EnvelopeBody, from_attributes=True)
        )
        message = wrap(body, next(_seqs))
        assert isinstance(message, JobOffer)
        await self.manager.on_offer(message)


def _spec(
    image: str, url: str, script: str, *, sha256: str = SHA, size: int = len(DATA)
) -> dict[str, Any]:
    return {
        "image": image,
        "command": ["sh", "-c", script],
        "timeout_s": 60,
        "grace_s": 1,
        "inputs": [{"path": "model.bin", "url": url, "sha256": sha256, "size_bytes": size}],
    }


async def _fetched(world: World, job_id: str, above: int) -> int:
    """Wait for a ``fetching`` status of ``job_id`` with more than ``above`` bytes done."""
    async with asyncio.timeout(60):
        while True:
            world.woken.clear()
            done = [
                body["inputs"][0]["done"]
                for kind, body in world.messages(job_id)
                if body.get("state") == "fetching"
            ]
            if done and done[-1] > above:
                return int(done[-1])
            await world.woken.wait()


@pytest.fixture
async def world(
    tmp_path: Path, docker_engine: str, test_image: str, test_image_id: str
) -> AsyncIterator[World]:
    node = NodeState(Scheduler([]))
    outbox = Outbox.open(tmp_path / "outbox.db")
    identity = load_or_create(tmp_path / "identity")
    cache = InputCache(tmp_path / "cache", 16 << 20)
    cache.open()
    woken = asyncio.Event()
    manager = JobManager(
        identity=identity,
        outbox=outbox,
        runner=Runner(DockerClient(docker_engine), RunnerConfig(jobs_dir=tmp_path / "jobs")),
        policy=Policy(
            allowed_images=[test_image_id],
            allowed_input_hosts=["127.0.0.1"],
        ),
        node=node,
        trusted_keys={COORDINATOR_ID: COORDINATOR_PUB},
        wake=woken.set,
        inputs=Inputs(cache, FetchLimits(stall_s=30.0, deadline_s=60.0)),
    )
    await manager.recover()
    node.release("initialising")
    # Offers name the image by its id: a tag is refused (image_not_pinned).
    yield World(manager, outbox, identity, cache, test_image_id, woken)
    await manager.shutdown()
    outbox.close()


async def test_a_job_reads_its_fetched_input_and_cannot_change_it(
    world: World, server: InputServer
) -> None:
    await world.offer("job-1", _spec(world.image, server.url("/file"), _TAMPER))
    await world.manager.wait_idle()
    assert world.states("job-1") == ["accepted", "fetching", "running", "completed"], (
        world.messages("job-1")
    )
    log = world.log("job-1")
    assert log.count(f"{SHA}  /input/model.bin") == 2
    for refused in ("append", "rm", "chmod", "mv", "touch"):
        assert f"{refused}-refused" in log
    assert world.cache.path_of(SHA).read_bytes() == DATA
    assert world.receipt("job-1")["state"] == "completed"


async def test_two_jobs_at_once_fetch_their_shared_input_once(
    world: World, server: InputServer
) -> None:
    script = "sha256sum /input/model.bin"
    await world.offer("job-a", _spec(world.image, server.url("/file"), script))
    await world.offer("job-b", _spec(world.image, server.url("/file"), script))
    await world.manager.wait_idle()
    await world.offer("job-c", _spec(world.image, server.url("/file"), script))
    await world.manager.wait_idle()
    for job_id in ("job-a", "job-b", "job-c"):
        assert world.states(job_id) == ["accepted", "fetching", "running", "completed"]
        assert world.log(job_id) == f"{SHA}  /input/model.bin\n"
    assert server.hits["/file"] == 1


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/status/404", "input_not_found"),
        ("/wrong", "input_digest_mismatch"),
        ("/more", "input_too_large"),
    ],
)
async def test_an_input_that_cannot_be_had_ends_the_job_before_it_starts(
    world: World, server: InputServer, path: str, code: str
) -> None:
    await world.offer("job-1", _spec(world.image, server.url(path), "echo ran"))
    await world.manager.wait_idle()
    assert world.states("job-1") == ["accepted", "fetching", "error"]
    receipt = world.receipt("job-1")
    assert (receipt["state"], receipt["code"]) == ("error", code)
    assert world.log("job-1") == ""
    assert not world.cache.holds(SHA)


async def test_an_input_from_a_host_the_policy_does_not_allow_is_refused(
    world: World, server: InputServer
) -> None:
    url = server.url("/file").replace("127.0.0.1", "localhost")
    await world.offer("job-1", _spec(world.image, url, "echo ran"))
    assert world.states("job-1") == ["refused"]
    assert server.hits["/file"] == 0


async def test_a_job_cancelled_while_its_input_is_fetched_ends_cancelled(
    world: World, server: InputServer
) -> None:
    await world.offer("job-1", _spec(world.image, server.url("/stall"), "echo ran"))
    await asyncio.to_thread(server.stalled.wait)
    cancel = wrap(JobCancelBody(job_id="job-1"), next(_seqs))
    assert isinstance(cancel, JobCancel)
    await world.manager.on_cancel(cancel)
    await world.manager.wait_idle()
    assert world.states("job-1") == ["accepted", "fetching", "cancelled"]
    assert not world.cache.holds(SHA)
    assert list((world.cache.root / "tmp").iterdir()) == []


async def test_a_job_reports_its_fetch_growing_before_it_runs(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "_PULL_REPORT_S", 0.0)  # each step (rate: unit tests)
    pieces, piece = 3, BUFFER_BYTES + 1024  # each fills at least one more sink buffer
    large = os.urandom(pieces * piece)
    sha = hashlib.sha256(large).hexdigest()
    with serve_input(large) as slow:
        slow.piece = piece
        spec = _spec(
            world.image, slow.url("/paced"), "wc -c < /input/model.bin", sha256=sha, size=len(large)
        )
        await world.offer("job-f", spec)
        seen = [await _fetched(world, "job-f", -1)]  # the move to fetching, at once
        assert seen == [0]
        assert world.manager.fetch_progress("job-f") == (0, len(large))
        for _ in range(pieces):
            slow.go.release()
            seen.append(await _fetched(world, "job-f", seen[-1]))
        await world.manager.wait_idle()
    assert seen[-1] <= len(large)
    states = world.states("job-f")
    assert states[:2] == ["accepted", "fetching"]
    assert states[-2:] == ["running", "completed"]
    assert set(states[1:-2]) == {"fetching"}
    assert world.log("job-f").strip() == str(len(large))
    assert world.manager.fetch_progress("job-f") is None


async def test_an_input_in_the_cache_is_reported_whole_at_once(
    world: World, server: InputServer
) -> None:
    await world.offer("job-1", _spec(world.image, server.url("/file"), "true"))
    await world.manager.wait_idle()
    await world.offer("job-2", _spec(world.image, server.url("/file"), "true"))
    await world.manager.wait_idle()
    [first, *_] = [b for k, b in world.messages("job-2") if b.get("state") == "fetching"]
    assert first["inputs"] == [{"path": "model.bin", "done": len(DATA), "total": len(DATA)}]
    assert server.hits["/file"] == 1


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
async def test_the_runner_binds_a_host_file_read_only_under_each_runtime(
    tmp_path: Path, docker_engine: str, test_image: str, runtime: str
) -> None:
    require_runtime(runtime)
    host = tmp_path / "cached"
    host.write_bytes(DATA)
    host.chmod(0o666)  # writable by anyone: only the read-only mount protects it
    spec = load_spec(
        msgspec.json.encode(_spec(test_image, "https://unused.example/m", _TAMPER)), "json"
    )
    runner = Runner(
        DockerClient(docker_engine), RunnerConfig(jobs_dir=tmp_path / "jobs", runtime=runtime)
    )
    await runner.prepare()
    out, result = b"", None
    async with aclosing(runner.run("job-ro", spec, [], {"model.bin": host})) as events:
        async for event in events:
            if isinstance(event, LogChunk):
                out += event.data
            elif isinstance(event, Finished):
                result = event.result
    assert isinstance(result, JobResult)
    assert result.reason == "completed", result.detail
    log = out.decode()
    assert log.count(f"{SHA}  /input/model.bin") == 2
    for refused in ("append", "rm", "chmod", "mv", "touch"):
        assert f"{refused}-refused" in log
    assert host.read_bytes() == DATA
    assert host.stat().st_mode & 0o777 == 0o666
