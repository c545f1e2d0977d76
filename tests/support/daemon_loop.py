"""A reference coordinator in the test's process and ``gpu-agent run`` as a child on a
fake NVML, on one port (:class:`Loop`); and the same with a real registry holding an image
of its own that the daemon may pull (:func:`registered`)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from coordinator.images import ImagePinner
from coordinator.jobs_store import JobRow
from coordinator.server import Coordinator
from oci import Credentials
from sandbox.container import LABEL_JOB
from sandbox.docker_api import DockerClient
from support.paths import XML
from support.processes import free_port
from support.registry import LocalRegistry, push_busybox, running_registry

__all__ = ["DUAL_A5000", "Loop", "Registered", "job_spec", "registered", "two_nodes"]

DUAL_A5000 = XML / "dual_a5000-v13.xml"


@dataclass
class Loop:
    """A coordinator in this process and an agent daemon as a child, on one port."""

    workdir: Path
    library: Path
    image: str
    docker: DockerClient
    port: int = field(default_factory=free_port)
    coordinator: Coordinator | None = None
    agent: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    pinner: ImagePinner | None = None
    extra_policy: str = ""
    """More of the agent's policy file (TOML), after ``allowed_images``."""

    async def start_coordinator(self) -> Coordinator:
        self.coordinator = Coordinator(
            db_path=self.workdir / "coordinator.db",
            state_dir=self.workdir / "coordinator",
            port=self.port,
            pinner=self.pinner,
        )
        await self.coordinator.start()
        return self.coordinator

    async def stop_coordinator(self) -> None:
        assert self.coordinator is not None
        await self.coordinator.stop()
        self.coordinator = None

    def start_agent(self, **extra_env: str) -> None:
        assert self.coordinator is not None
        policy = self.workdir / "policy.toml"
        # The image is pinned by its id (offers never name a tag); the policy allows that id.
        policy.write_text(f'allowed_images = ["{self.image}"]\n' + self.extra_policy)
        argv = [
            sys.executable, "-m", "agent.cli", "run",
            "--coordinator", f"ws://127.0.0.1:{self.port}/agent",
            "--coordinator-key", self.coordinator.key.public_key_b64,
            "--state-dir", str(self.workdir / "agent"), "--policy", str(policy),
            "--runtime-dir", str(self.workdir / "run"),
            "--interval", "0.2", "--batch", "5",
        ]  # fmt: skip
        env = {
            **os.environ,
            "GPU_AGENT_NVML_LIB": str(self.library),
            "FAKENVML_CONTROL": str(self.workdir / "nvml-control"),
            **extra_env,
        }
        with (self.workdir / "agent.log").open("ab") as log:
            self.agent = subprocess.Popen(argv, env=env, stdout=log, stderr=log)

    async def exited(self) -> int:
        """The agent's exit status, once it has exited. Waited for in a thread: the
        coordinator shares this event loop and must go on serving the agent meanwhile."""
        assert self.agent is not None
        return await asyncio.to_thread(self.agent.wait, 60)

    @property
    def c(self) -> Coordinator:
        assert self.coordinator is not None
        return self.coordinator

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.agent is not None and self.agent.poll() is not None:
                log = (self.workdir / "agent.log").read_text()
                pytest.fail(f"the agent exited {self.agent.returncode} waiting for {what}:\n{log}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def until_async(
        self, read: Callable[[], Awaitable[object]], expected: object, what: str
    ) -> None:
        """Wait until an async read returns ``expected``."""
        seen: list[object] = []

        async def poll() -> None:
            while (value := await read()) != expected:
                seen[:] = [value]
                await asyncio.sleep(0.05)

        try:
            await asyncio.wait_for(poll(), 60)
        except TimeoutError:
            pytest.fail(f"timed out waiting for {what}; last seen {seen}")

    async def ready(self) -> str:
        """Wait for the agent to connect and report capacity; its node id."""
        await self.until(lambda: bool(self.c.connected()), "the agent to connect")
        [self.node_id] = self.c.connected()
        await self.until(
            lambda: self.c.store.nodes.latest(self.node_id, "node_status") is not None,
            "the node's capacity",
        )
        return self.node_id

    def job(self, job_id: str) -> JobRow:
        row = self.c.store.jobs.get(job_id)
        assert row is not None
        return row

    def bodies(self, kind: str, job_id: str) -> list[dict[str, Any]]:
        stored = self.c.store.nodes.messages(self.node_id, kind, limit=100_000)
        return [m.body for m in stored if m.body.get("job_id") == job_id]

    def states(self, job_id: str) -> list[str]:
        return [b["state"] for b in self.bodies("job_status", job_id)]

    async def containers(self, job_id: str) -> list[Any]:
        filters = msgspec.json.encode({"label": [f"{LABEL_JOB}={job_id}"]}).decode()
        answer = await self.docker.request(
            "GET", "/containers/json", params={"all": 1, "filters": filters}
        )
        return list(answer.json())


def job_spec(image: str, script: str) -> dict[str, Any]:
    return {"image": image, "command": ["sh", "-c", script], "timeout_s": 120, "grace_s": 2}


@dataclass
class Registered:
    """A real registry with one image of its own pushed, and a daemon that may pull it."""

    loop: Loop
    registry: LocalRegistry
    tag: str
    pinned: str


@asynccontextmanager
async def registered(
    tmp_path: Path,
    library_for: Callable[[Path], Path],
    extra_policy: str = "",
    *,
    logins_everywhere: bool = True,
) -> AsyncIterator[Registered]:
    """Without ``logins_everywhere``, neither the node nor the coordinator has a login of
    the registry (``tmp_path / "registries.toml"`` still holds one, for a submitter)."""
    (tmp_path / "registry").mkdir()
    with running_registry(tmp_path / "registry") as registry:
        # An image the engine does not have once pushed: busybox and a layer of its own.
        tag = f"{registry.host}/e2e/job:1"
        pinned = push_busybox(registry, tag, os.urandom(1 << 16), tmp_path)
        logins = tmp_path / "registries.toml"
        logins.write_text(
            f'[registry."{registry.host}"]\n'
            f'username = "{registry.username}"\npassword = "{registry.password}"\n'
        )
        logins.chmod(0o600)
        login = Credentials(registry.username, registry.password)
        loop = Loop(tmp_path, library_for(DUAL_A5000), f"{registry.host}/e2e/job", DockerClient())
        pinner_logins = {registry.host: login} if logins_everywhere else {}
        loop.pinner = ImagePinner(logins=pinner_logins, ca_file=registry.ca_file)
        loop.extra_policy = extra_policy
        await loop.start_coordinator()
        if logins_everywhere:
            loop.start_agent(GPU_AGENT_JOBS_REGISTRY_LOGINS_FILE=str(logins))
        else:
            loop.start_agent()
        try:
            yield Registered(loop, registry, tag, pinned)
        finally:
            if loop.agent is not None and loop.agent.poll() is None:
                loop.agent.send_signal(signal.SIGTERM)
                await loop.exited()
            await loop.stop_coordinator()


async def _node_of(loop: Loop, known: set[str]) -> str:
    """Start ``loop``'s agent; its node id once it is connected and has said its capacity."""
    loop.start_agent()
    await loop.until(lambda: len(set(loop.c.connected()) - known) == 1, "the agent to connect")
    [loop.node_id] = set(loop.c.connected()) - known
    await loop.until(
        lambda: loop.c.store.nodes.latest(loop.node_id, "node_status") is not None,
        "the node's capacity",
    )
    return loop.node_id


@asynccontextmanager
async def two_nodes(
    workdir: Path,
    library: Path,
    image: str,
    *,
    extra_policy: str = "",
    **coordinator: Any,
) -> AsyncIterator[tuple[Loop, Loop]]:
    """One coordinator in this process (``coordinator``: more of its arguments) and two
    agent daemons, each a :class:`Loop` of its own state directory, both connected."""
    a = Loop(workdir / "a", library, image, DockerClient())
    b = Loop(workdir / "b", library, image, DockerClient(), port=a.port)
    for loop in (a, b):
        loop.workdir.mkdir()
        loop.extra_policy = extra_policy
    a.coordinator = b.coordinator = Coordinator(
        db_path=workdir / "coordinator.db",
        state_dir=workdir / "coordinator",
        port=a.port,
        **coordinator,
    )
    await a.c.start()
    try:
        await _node_of(a, set())
        await _node_of(b, {a.node_id})
        yield a, b
    finally:
        for loop in (a, b):
            if loop.agent is not None and loop.agent.poll() is None:
                loop.agent.send_signal(signal.SIGTERM)
                await loop.exited()
        await a.c.stop()
