"""The typed engine client: what it sends, what it reads, and what each refusal means.

Against a scripted engine on a real unix socket (shapes, refusals, malformed answers) and
against the real engine (a container's whole life through :class:`Engine`).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import msgspec
import pytest

from sandbox.container import LABEL_JOB, create_body
from sandbox.docker_api import DockerClient
from sandbox.engine import Engine
from sandbox.errors import EngineError, RunError
from sandbox.gpu_mapping import ContainerGpus
from sandbox.jobdir import JobMounts
from sandbox.spec import load_spec

# ------------------------------------------------------------------ what is sent


# ------------------------------------------------------------------ what refusals mean


# ------------------------------------------------------------------ malformed answers


# ------------------------------------------------------------------ on the real engine


async def test_a_containers_whole_life_through_the_engine(
    docker_engine: str, test_image: str, tmp_path: Path
) -> None:
    engine = Engine(DockerClient(docker_engine))
    info = await engine.info()
    assert "runc" in (info.runtimes or {})
    image = await engine.inspect_image(test_image)
    assert image.id.startswith("sha256:")
    job = f"engine-{uuid.uuid4().hex[:8]}"
    spec = load_spec(
        json.dumps({"image": test_image, "command": ["sh", "-c", "echo out; exit 3"]}).encode(),
        "json",
    )
    config = create_body(
        job_id=job,
        spec=spec,
        image_id=image.id,
        gpus=ContainerGpus(),
        mounts=JobMounts(),
        user="65534:65534",
        runtime="runc",
        cgroup_parent=None,
        runner="test",
        image_volumes=image.volumes,
    )
    container_id = await engine.create(f"gpu-agent-{job}", config)
    try:
        assert [c.id for c in await engine.containers(f"{LABEL_JOB}={job}")] == [container_id]
        async with engine.attach(container_id) as attached:
            exited = await engine.arm_wait(container_id)
            await engine.start(container_id)
            await exited()
            frames = [frame async for frame in attached.frames()]
        assert frames == [("stdout", b"out\n")]
        state = (await engine.inspect(container_id)).state
        assert (state.exit_code, state.oom_killed) == (3, False)
        assert state.started is not None
        assert state.finished is not None
        assert await engine.kill(container_id) is False  # 409: not running
        assert await engine.stop(container_id, grace_s=0) is False  # 304: stopped already
    finally:
        assert await engine.remove(container_id) is True
    with pytest.raises(EngineError) as raised:
        await engine.inspect(container_id)
    assert raised.value.code == "not_found"
    assert await engine.remove(container_id) is True  # gone already
    assert await engine.containers(f"{LABEL_JOB}={job}") == []


async def test_the_real_engine_refuses_as_mapped(docker_engine: str, test_image: str) -> None:
    engine = Engine(DockerClient(docker_engine))
    with pytest.raises(EngineError) as missing:
        await engine.inspect_image(f"gpu-agent-test/absent-{uuid.uuid4().hex[:8]}:1")
    assert missing.value.code == "image_not_found"
    job = f"nostart-{uuid.uuid4().hex[:8]}"
    config = create_body(
        job_id=job,
        spec=load_spec(
            json.dumps({"image": test_image, "command": ["/no/such/program"]}).encode(), "json"
        ),
        image_id=(await engine.inspect_image(test_image)).id,
        gpus=ContainerGpus(),
        mounts=JobMounts(),
        user="65534:65534",
        runtime="runc",
        cgroup_parent=None,
        runner="test",
        image_volumes=[],
    )
    # No init: the engine itself execs the program that is not there, and refuses the start.
    config = msgspec.structs.replace(
        config, host_config=msgspec.structs.replace(config.host_config, init=False)
    )
    container_id = await engine.create(f"gpu-agent-{job}", config)
    try:
        with pytest.raises(RunError) as refused:
            await engine.start(container_id)
        assert refused.value.code == "start_failed"
    finally:
        assert await engine.remove(container_id) is True


# ------------------------------------------------------ the runner sees only coded errors
