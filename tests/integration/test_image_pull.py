"""Images pulled by digest through the Engine API from a real registry (Debian's
docker-registry on loopback), and the job that runs them; the failures, coded."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from support.processes import free_port
from support.registry import build_busybox
from support.world import World, deliver, offer_message, spec

from sandbox.docker_api import DockerClient
from sandbox.engine import Engine
from sandbox.engine_types import ImageInfo
from sandbox.errors import EngineError, PullError
from sandbox.events import Created, Finished, Pulling
from sandbox.policy import Policy
from sandbox.runner import Runner, RunnerConfig, _check_pulled
from sandbox.spec import ImageRef, load_spec

REGISTRY = shutil.which("docker-registry")
needs_registry = pytest.mark.skipif(
    REGISTRY is None and os.environ.get("GPU_AGENT_REQUIRE_DOCKER") != "1",
    reason="Debian's docker-registry is not installed",
)


@dataclass(frozen=True)
class Pushed:
    """An image in the test registry that the engine does not have: ``ref`` by digest."""

    host: str
    ref: str


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def registry(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A registry on loopback (plain HTTP: the engine trusts 127.0.0.0/8 as it is)."""
    assert REGISTRY is not None, "docker-registry is missing (.ci/run installs it)"
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = root / "config.yml"
    config.write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\nlog:\n  level: error\n"
    )
    process = subprocess.Popen(
        [REGISTRY, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the registry did not start"
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def _push(registry: str, name: str, context: Path) -> Pushed:
    """busybox plus a layer of 1 MiB of random bytes, pushed, then removed from the host."""
    tag = f"{registry}/{name}:1"
    build_busybox(tag, context / "image", os.urandom(1 << 20))
    _run("docker", "push", "--quiet", tag)
    digest = _run("docker", "image", "inspect", "--format", "{{index .RepoDigests 0}}", tag)
    _run("docker", "image", "rm", "--force", tag)
    return Pushed(registry, digest)


@pytest.fixture(scope="module")
def pushed(registry: str, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    return _push(registry, "pulltest/busybox", tmp_path_factory.mktemp("pushed"))


@pytest.fixture(scope="module")
def two_more(registry: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Pushed, Pushed]:
    """Two more images, each with a layer of its own, for the cache's tests."""
    return (
        _push(registry, "cache/first", tmp_path_factory.mktemp("first")),
        _push(registry, "cache/second", tmp_path_factory.mktemp("second")),
    )


async def _remove(ref: str) -> None:
    subprocess.run(["docker", "image", "rm", "--force", ref], capture_output=True, check=False)


@pytest.fixture
def engine(docker_engine: str) -> Engine:
    return Engine(DockerClient(docker_engine))


@needs_registry
async def test_an_image_pinned_by_digest_is_pulled_with_its_progress(
    engine: Engine, pushed: Pushed
) -> None:
    await _remove(pushed.ref)
    progress: list[tuple[str, int, int]] = []
    await engine.pull(pushed.ref, on_progress=lambda *seen: progress.append(seen))
    image = await engine.inspect_image(pushed.ref)
    assert pushed.ref in (image.repo_digests or [])
    # The random layer was downloaded, and its total is what was announced.
    assert progress
    assert all(0 <= done <= total for _, done, total in progress if total)


@needs_registry
async def test_a_digest_the_registry_does_not_have_is_image_not_found(
    engine: Engine, pushed: Pushed
) -> None:
    missing = pushed.ref.split("@")[0] + "@sha256:" + "0" * 64
    with pytest.raises(PullError) as caught:
        await engine.pull(missing)
    assert caught.value.code == "image_not_found"


async def test_a_registry_that_is_not_there_is_unreachable(engine: Engine) -> None:
    ref = f"127.0.0.1:{free_port()}/nobody/here@sha256:" + "0" * 64
    with pytest.raises(PullError) as caught:
        await engine.pull(ref)
    assert caught.value.code == "registry_unreachable"


async def test_a_registry_that_stalls_is_a_pull_timeout(engine: Engine) -> None:
    held: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # The engine's own client gives up on it first, or this side's idle timeout does.
        with pytest.raises(PullError) as caught:
            await engine.pull(f"127.0.0.1:{port}/slow/image@sha256:" + "0" * 64, idle_timeout_s=2)
        assert caught.value.code == "pull_timeout"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def test_an_image_the_engine_holds_under_another_digest_is_a_mismatch() -> None:
    ref = ImageRef.parse("127.0.0.1:5000/a/b@sha256:" + "1" * 64)
    other = ImageInfo(
        id="sha256:" + "2" * 64, repo_digests=["127.0.0.1:5000/a/b@sha256:" + "3" * 64]
    )
    with pytest.raises(PullError) as caught:
        _check_pulled(ref, other)
    assert caught.value.code == "digest_mismatch"
    _check_pulled(ref, ImageInfo(id="x", repo_digests=[f"127.0.0.1:5000/a/b@{ref.digest}"]))


@needs_registry
async def test_the_runner_pulls_a_pinned_image_it_lacks_and_runs_the_job(
    docker_engine: str, pushed: Pushed, tmp_path: Path
) -> None:
    await _remove(pushed.ref)
    runner = Runner(DockerClient(docker_engine), RunnerConfig(jobs_dir=tmp_path / "jobs"))
    await runner.prepare()
    spec = load_spec(
        msgspec.json.encode(
            {"image": pushed.ref, "command": ["sh", "-c", "cat /blob | wc -c"], "timeout_s": 60}
        ),
        "json",
    )
    events = []
    async with aclosing(runner.run("pull-1", spec, [])) as run:
        async for event in run:
            events.append(event)
    kinds = [type(e) for e in events]
    assert Pulling in kinds
    assert kinds.index(Pulling) < kinds.index(Created)
    [finished] = [e for e in events if isinstance(e, Finished)]
    assert (finished.result.reason, finished.result.exit_code) == ("completed", 0)


@needs_registry
async def test_a_tag_is_never_pulled(docker_engine: str, pushed: Pushed, tmp_path: Path) -> None:
    runner = Runner(DockerClient(docker_engine), RunnerConfig(jobs_dir=tmp_path / "jobs"))
    await runner.prepare()
    tag = pushed.ref.split("@")[0] + ":1"
    await _remove(tag)
    spec = load_spec(msgspec.json.encode({"image": tag, "command": ["true"]}), "json")
    async with aclosing(runner.run("pull-2", spec, [])) as run:
        events = [event async for event in run]
    assert not [e for e in events if isinstance(e, Pulling)]
    [finished] = [e for e in events if isinstance(e, Finished)]
    assert finished.result.error_code == "image_not_found"


@needs_registry
async def test_a_job_reports_pulling_with_progress_then_runs(
    world: World,
    pushed: Pushed,
) -> None:
    await _remove(pushed.ref)
    world.manager.policy = Policy(allowed_images=[pushed.ref.split("@")[0]])
    job = spec(pushed.ref, "cat /blob | wc -c")
    await deliver(world, offer_message(world, "job-pull", job))
    await world.manager.wait_idle()
    states = world.states("job-pull")
    assert states[0] == "accepted"
    assert states[1] == "pulling"
    assert states[-2:] == ["running", "completed"]
    assert set(states[1:-2]) <= {"pulling"}
    [first, *_] = [b for k, b in world.messages("job-pull") if b.get("state") == "pulling"]
    assert first["progress"]
    assert world.log("job-pull").strip() == str(1 << 20)


@needs_registry
async def test_a_job_whose_image_cannot_be_pulled_ends_with_the_pulls_code(
    world: World,
    pushed: Pushed,
) -> None:
    missing = pushed.ref.split("@")[0] + "@sha256:" + "0" * 64
    world.manager.policy = Policy(allowed_images=[pushed.ref.split("@")[0]])
    await deliver(world, offer_message(world, "job-nopull", spec(missing, "true")))
    await world.manager.wait_idle()
    assert world.states("job-nopull") == ["accepted", "error"]
    receipt = world.receipt("job-nopull")
    assert (receipt["state"], receipt["code"]) == ("error", "image_not_found")


async def _image_exists(engine: Engine, ref: str) -> bool:
    try:
        await engine.inspect_image(ref)
    except EngineError:
        return False
    return True


@needs_registry
async def test_a_second_job_on_a_cached_image_pulls_nothing_and_marks_it_used(
    world: World,
    pushed: Pushed,
) -> None:
    await _remove(pushed.ref)
    world.manager.policy = Policy(allowed_images=[pushed.ref.split("@")[0]])
    await deliver(world, offer_message(world, "job-c1", spec(pushed.ref, "true")))
    await world.manager.wait_idle()
    [first] = world.manager.ledger.cached_images()
    assert first.reference == pushed.ref
    await deliver(world, offer_message(world, "job-c2", spec(pushed.ref, "true")))
    await world.manager.wait_idle()
    assert world.states("job-c2") == ["accepted", "running", "completed"]  # no pulling
    [again] = world.manager.ledger.cached_images()
    assert again.used > first.used


@needs_registry
async def test_the_least_recently_used_pulled_image_goes_first_and_the_owners_never(
    world: World,
    two_more: tuple[Pushed, Pushed],
    test_image_id: str,
) -> None:
    first, second = two_more
    for each in two_more:
        await _remove(each.ref)
    engine = world.manager.runner.engine
    world.manager.policy = Policy(allowed_images=[p.ref.split("@")[0] for p in two_more])
    await deliver(world, offer_message(world, "job-l1", spec(first.ref, "true")))
    await world.manager.wait_idle()
    [cached] = world.manager.ledger.cached_images()
    # Room for one of them only: the second pull pushes the first, unused now, out.
    world.manager.image_cache.max_bytes = cached.size + cached.size // 2
    await deliver(world, offer_message(world, "job-l2", spec(second.ref, "true")))
    await world.manager.wait_idle()
    assert [c.reference for c in world.manager.ledger.cached_images()] == [second.ref]
    assert not await _image_exists(engine, first.ref)
    assert await _image_exists(engine, second.ref)
    # A budget of nothing: what a running job uses stays, and so does the owner's image.
    world.manager.image_cache.max_bytes = 0
    trimmed = await world.manager.image_cache.trim(in_use={second.ref})
    assert trimmed.removed == ()
    assert await _image_exists(engine, second.ref)
    assert (await world.manager.image_cache.trim(in_use=())).removed == (second.ref,)
    assert world.manager.ledger.cached_images() == []
    assert await _image_exists(engine, test_image_id)


@needs_registry
async def test_a_prefetch_pulls_an_allowed_pinned_image_into_the_cache_and_nothing_else(
    world: World,
    pushed: Pushed,
) -> None:
    await _remove(pushed.ref)
    prefetcher = world.manager.prefetcher
    assert not prefetcher.soon(pushed.ref)  # the policy does not allow it yet
    assert not prefetcher.soon(pushed.ref.split("@")[0] + ":1")  # a tag: never pulled
    world.manager.policy = Policy(allowed_images=[pushed.ref.split("@")[0]])
    assert prefetcher.soon(pushed.ref)
    assert prefetcher.soon(pushed.ref)  # the same image again: one pull
    assert len(prefetcher.tasks) == 1
    await asyncio.gather(*prefetcher.tasks.values())
    assert [c.reference for c in world.manager.ledger.cached_images()] == [pushed.ref]
    assert await _image_exists(world.manager.runner.engine, pushed.ref)


@needs_registry
async def test_an_image_larger_unpacked_than_the_cap_is_removed_again_and_refused(
    docker_engine: str, pushed: Pushed, tmp_path: Path
) -> None:
    await _remove(pushed.ref)
    config = RunnerConfig(jobs_dir=tmp_path / "jobs", max_image_unpacked_bytes=1 << 20)
    runner = Runner(DockerClient(docker_engine), config)
    await runner.prepare()
    spec = load_spec(msgspec.json.encode({"image": pushed.ref, "command": ["true"]}), "json")
    async with aclosing(runner.run("pull-big", spec, [])) as run:
        events = [event async for event in run]
    [finished] = [e for e in events if isinstance(e, Finished)]
    assert finished.result.error_code == "image_too_large"
    assert "unpacked" in finished.result.detail
    assert not [e for e in events if isinstance(e, Created)]
    with pytest.raises(EngineError):  # not left on the owner's disk
        await Engine(DockerClient(docker_engine)).inspect_image(pushed.ref)
