"""Fixtures only the integration tests use: a prepared runner per runtime, the job manager's
world on the real engine, a coordinator with a real agent daemon (``loop``), the
llama-server image and the tiny model it serves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from support import factories
from support.daemon_loop import DUAL_A5000, Loop
from support.deb import ARCH, VERSION, Debs
from support.engine import require_runtime
from support.llama import BuildToolsMissing, llama_server_image
from support.packaging import ROOT, require_tool
from support.postgres import postgres_cluster, postgres_url
from support.runner import RUNTIMES, leftovers
from support.tiny_model import tiny_model
from support.world import COORDINATOR_ID, COORDINATOR_PUB, World

from agent.jobs.manager import JobManager
from agent.jobs.node import NodeState
from agent.jobs.scheduler import Scheduler
from agent.link.identity import load_or_create
from agent.link.outbox import Outbox
from coordinator.db import DbTarget
from hal.types import UNSUPPORTED
from sandbox.container import LABEL_RUNNER
from sandbox.docker_api import DockerClient
from sandbox.policy import Policy
from sandbox.runner import Runner, RunnerConfig

__all__ = ["postgres_cluster", "postgres_url"]  # fixtures of support.postgres, here for all


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> DbTarget:
    """Where a store is, once per backend: a SQLite file, and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "coordinator.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(params=RUNTIMES)
async def runner(
    request: pytest.FixtureRequest, docker_engine: str, test_image: str, tmp_path: Path
) -> AsyncIterator[Runner]:
    """A prepared runner, once per runtime, whose jobs leave nothing behind."""
    require_runtime(request.param)
    jobs_dir = tmp_path / "jobs"
    config = RunnerConfig(jobs_dir=jobs_dir, runtime=request.param)
    runner = Runner(DockerClient(docker_engine), config)
    await runner.prepare()
    yield runner
    assert leftovers(jobs_dir, f"{LABEL_RUNNER}={runner.instance}") == ([], [])


@pytest.fixture
async def world(
    tmp_path: Path, docker_engine: str, test_image: str, test_image_id: str
) -> AsyncIterator[World]:
    dri = tmp_path / "dev" / "dri"
    dri.mkdir(parents=True)
    # Stand-ins for two Intel GPUs' render nodes: Docker resolves the links and maps the
    # real device nodes behind them, so a job can see which ones it was given.
    (dri / "renderD128").symlink_to("/dev/null")
    (dri / "renderD129").symlink_to("/dev/zero")
    gpus = [
        factories.gpu(
            id=f"pci:0000:0{i}:00.0",
            vendor="intel",
            backend="intel",
            uuid=UNSUPPORTED,
            pci_bus_id=f"0000:0{i}:00.0",
            render_node=str(dri / f"renderD{128 + i}"),
        )
        for i in range(2)
    ]
    scheduler = Scheduler(gpus)
    for unit_id in scheduler.units:
        scheduler.set_health(unit_id, "healthy")
    node = NodeState(scheduler)
    outbox = Outbox.open(tmp_path / "outbox.db")
    identity = load_or_create(tmp_path / "identity")
    client = DockerClient(docker_engine)
    manager = JobManager(
        identity=identity,
        outbox=outbox,
        runner=Runner(client, RunnerConfig(jobs_dir=tmp_path / "jobs")),
        policy=Policy(allowed_images=[test_image.split(":", maxsplit=1)[0], test_image_id]),
        node=node,
        trusted_keys={COORDINATOR_ID: COORDINATOR_PUB},
        wake=lambda: None,
    )
    await manager.recover()
    node.release("initialising")
    # Offers name the image by its id: a tag is refused (image_not_pinned).
    yield World(manager, outbox, identity, client, test_image_id)
    await manager.shutdown()
    outbox.close()


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Debs:
    require_tool("dpkg-deb")
    out = tmp_path_factory.mktemp("deb")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/build_deb.py"), "--out", str(out)],
        capture_output=True,
        check=True,
        timeout=600,
    )
    service = out / f"gpu-agent_{VERSION}_{ARCH}.deb"
    tray = out / f"gpu-agent-tray_{VERSION}_{ARCH}.deb"
    assert sorted(out.glob("*.deb")) == sorted([service, tray])
    root = tmp_path_factory.mktemp("root")
    for package in (service, tray):
        subprocess.run(["dpkg-deb", "-x", str(package), str(root)], check=True, timeout=60)
    return Debs(service, tray, root)


@pytest.fixture(scope="session")
def llama_image(docker_engine: str) -> str:
    """The llama-server image's tag; built first (many minutes, once per machine: ``make
    llama-image``) where the engine lacks it."""
    try:
        return llama_server_image(docker_engine)
    except BuildToolsMissing as missing:
        if os.environ.get("GPU_AGENT_REQUIRE_DOCKER") == "1":
            pytest.fail(str(missing))
        pytest.skip(str(missing))


@pytest.fixture(scope="session")
def tiny_model_file() -> Path:
    """The default tiny llama model (about 4 MB), from the cache or written there once."""
    return tiny_model()


@pytest.fixture
async def loop(
    tmp_path: Path, library_for: Callable[[Path], Path], test_image_id: str, docker_engine: str
) -> AsyncIterator[Loop]:
    """A coordinator in this process and a real agent daemon of two recorded GPUs,
    connected; stopped after the test."""
    world = Loop(tmp_path, library_for(DUAL_A5000), test_image_id, DockerClient(docker_engine))
    await world.start_coordinator()
    world.start_agent()
    await world.ready()
    yield world
    if world.agent is not None and world.agent.poll() is None:
        world.agent.send_signal(signal.SIGTERM)
        await world.exited()
    if world.coordinator is not None:
        await world.stop_coordinator()
