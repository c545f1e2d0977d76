"""The typed engine client: what it sends, what it reads, and what each refusal means.

These tests need nothing outside this process; the others are in
tests/integration/test_engine.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sandbox.container import create_body
from sandbox.docker_api import DockerClient, quote_ref
from sandbox.engine import Engine
from sandbox.engine_types import ContainerConfig
from sandbox.errors import EngineError, PullError, RunError
from sandbox.events import Finished
from sandbox.gpu_mapping import ContainerGpus, DeviceFacts, HostGroups, map_gpus
from sandbox.jobdir import JobMounts
from sandbox.runner import Runner, RunnerConfig
from sandbox.spec import load_spec

Answer = tuple[int, bytes]


ID = "c" * 64


class Scripted:
    """A fake engine: answers each ``METHOD /path`` (no version prefix, no query) as
    scripted, and keeps what it was sent."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.answers: dict[str, Answer] = {"GET /version": (200, b'{"ApiVersion": "1.44"}')}
        self.sent: list[tuple[str, bytes]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = next(
            (
                int(line.split(":")[1])
                for line in head.split("\r\n")
                if line.startswith("Content-L")
            ),
            0,
        )
        body = await reader.readexactly(length)
        method, target = head.split(" ")[:2]
        route = f"{method} {re.sub(r'^/v[0-9.]+/', '/', target.split('?')[0])}"
        self.sent.append((f"{method} {target}", body))
        status, answer = self.answers.get(route, (404, b'{"message": "no route"}'))
        writer.write(
            b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(answer), answer)
        )
        await writer.drain()
        writer.close()


@pytest.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[Scripted]:
    fake = Scripted(str(tmp_path / "docker.sock"))
    server = await asyncio.start_unix_server(fake.handle, fake.path)
    async with server:
        yield fake


def _engine(fake: Scripted) -> Engine:
    return Engine(DockerClient(fake.path))


def test_the_create_body_encodes_as_the_engine_api_names_it() -> None:
    spec = load_spec(
        json.dumps(
            {"image": "x", "command": ["sh"], "network": "egress", "resources": {"cpus": 1.5}}
        ).encode(),
        "json",
    )
    nvidia = DeviceFacts(vendor="nvidia", uuid="GPU-1", pci_bus_id=None, render_node=None)
    amd = DeviceFacts(vendor="amd", uuid=None, pci_bus_id=None, render_node="/dev/dri/renderD128")
    config = create_body(
        job_id="j-1",
        spec=spec,
        image_id="sha256:" + "a" * 64,
        gpus=map_gpus([nvidia, amd], cdi=False, groups=HostGroups(video_gid=44, render_gid=105)),
        mounts=JobMounts(output_dir=Path("/jobs/j-1/output")),
        user="7:7",
        runtime="runc",
        cgroup_parent="gpu-agent/j-1",
        runner="r",
        image_volumes=[],
    )
    body: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(config))
    host = body.pop("HostConfig")
    assert body == {
        "Image": "sha256:" + "a" * 64,
        "Env": ["NVIDIA_DRIVER_CAPABILITIES=compute,utility"],
        "WorkingDir": "/scratch",
        "User": "7:7",
        "Labels": {
            "io.gpu-agent.managed": "1",
            "io.gpu-agent.job": "j-1",
            "io.gpu-agent.runner": "r",
        },
        "NetworkDisabled": False,
        "StopSignal": "SIGTERM",
        "StopTimeout": 10,
        "AttachStdout": False,
        "AttachStderr": False,
        "Tty": False,
        "Entrypoint": ["sh"],
        "Cmd": [],  # a command given: the image's own CMD is not its arguments
    }
    assert {key: host[key] for key in ("NanoCpus", "NetworkMode", "CgroupParent", "Binds")} == {
        "NanoCpus": 1_500_000_000,
        "NetworkMode": "bridge",
        "CgroupParent": "gpu-agent/j-1",
        "Binds": ["/jobs/j-1/output:/output:rw"],
    }
    assert host["Ulimits"][0] == {"Name": "fsize", "Soft": 256 << 20, "Hard": 256 << 20}
    assert host["LogConfig"] == {"Type": "none", "Config": {}}
    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "DeviceIDs": ["GPU-1"], "Capabilities": [["gpu"]]}
    ]
    assert host["Devices"][0] == {
        "PathOnHost": "/dev/kfd",
        "PathInContainer": "/dev/kfd",
        "CgroupPermissions": "rw",
    }
    # Every setting is sent, also where it is the engine's default.
    assert (host["Privileged"], host["AutoRemove"], host["GroupAdd"]) == (
        False,
        False,
        ["44", "105"],
    )


def test_no_command_keeps_the_images_entrypoint_and_cmd_and_no_parent_the_engines() -> None:
    config = create_body(
        job_id="j-2",
        spec=load_spec(b'{"image": "x"}', "json"),
        image_id="sha256:" + "b" * 64,
        gpus=ContainerGpus(),
        mounts=JobMounts(),
        user="1:2",
        runtime="runc",
        cgroup_parent=None,
        runner="r",
        image_volumes=[],
    )
    body = msgspec.json.decode(msgspec.json.encode(config))
    assert "Entrypoint" not in body
    assert "Cmd" not in body
    assert "CgroupParent" not in body["HostConfig"]


async def test_containers_are_listed_by_label_with_every_state(scripted: Scripted) -> None:
    scripted.answers["GET /containers/json"] = (200, b'[{"Id": "a", "Labels": {"k": "v"}}]')
    listed = await _engine(scripted).containers("k")
    assert [(c.id, c.label("k"), c.label("other")) for c in listed] == [("a", "v", "")]
    target = scripted.sent[-1][0]
    assert "all=1" in target
    assert "filters=%7B%22label%22%3A%5B%22k%22%5D%7D" in target  # {"label":["k"]}


async def test_a_stopped_container_stopped_again_is_no_error(scripted: Scripted) -> None:
    scripted.answers[f"POST /containers/{ID}/stop"] = (304, b"")
    assert await _engine(scripted).stop(ID, grace_s=1) is False


async def test_other_refusals_of_a_stop_are_engine_errors(scripted: Scripted) -> None:
    scripted.answers[f"POST /containers/{ID}/stop"] = (500, b'{"message": "boom"}')
    with pytest.raises(EngineError) as raised:
        await _engine(scripted).stop(ID, grace_s=1)
    assert (raised.value.code, raised.value.status) == ("engine_error", 500)
    assert "boom" in raised.value.detail


async def test_missing_image_is_image_not_found(scripted: Scripted) -> None:
    scripted.answers["GET /images/nope/json"] = (404, b'{"message": "No such image: nope"}')
    with pytest.raises(EngineError) as raised:
        await _engine(scripted).inspect_image("nope")
    assert raised.value.code == "image_not_found"


@pytest.mark.parametrize(
    ("message", "code"),
    [
        # The registry's port holds 404: the words say what happened, not the digits.
        (
            'Get "http://127.0.0.1:40412/v2/": net/http: request canceled'
            " (Client.Timeout exceeded while awaiting headers)",
            "pull_timeout",
        ),
        ("dial tcp 127.0.0.1:14040: connect: connection refused", "registry_unreachable"),
        ("error parsing HTTP 404 response body: unexpected end of JSON input", "image_not_found"),
        ("manifest for 127.0.0.1:5000/a not found: manifest unknown", "image_not_found"),
        ("unexpected status code 404", "image_not_found"),
    ],
)
@pytest.mark.parametrize("streamed", [False, True], ids=["refused", "streamed"])
async def test_a_failed_pull_is_coded_by_the_engines_words_not_a_port(
    scripted: Scripted, message: str, code: str, streamed: bool
) -> None:
    if streamed:  # the pull began, and its stream says it failed
        answer = (200, msgspec.json.encode({"error": message}) + b"\n")
    else:  # the engine refused it outright
        answer = (500, msgspec.json.encode({"message": message}))
    scripted.answers["POST /images/create"] = answer
    with pytest.raises(PullError) as raised:
        await _engine(scripted).pull("127.0.0.1:40412/a@sha256:" + "0" * 64)
    assert raised.value.code == code


async def test_an_image_gone_before_the_create_is_image_not_found(scripted: Scripted) -> None:
    scripted.answers["POST /containers/create"] = (404, b'{"message": "No such image"}')
    config = msgspec.convert(
        {"Image": "x", "Env": [], "WorkingDir": "/", "User": "1", "Labels": {}}
        | {"NetworkDisabled": True, "StopSignal": "SIGTERM", "StopTimeout": 1}
        | {"AttachStdout": False, "AttachStderr": False, "Tty": False}
        | {"HostConfig": _HOST_CONFIG},
        ContainerConfig,
    )
    with pytest.raises(EngineError) as raised:
        await _engine(scripted).create("gpu-agent-x", config)
    assert raised.value.code == "image_not_found"
    assert "name=gpu-agent-x" in scripted.sent[-1][0]
    assert json.loads(scripted.sent[-1][1])["Image"] == "x"


async def test_a_missing_container_is_not_found_and_its_removal_done(scripted: Scripted) -> None:
    gone = (404, b'{"message": "No such container"}')
    scripted.answers[f"GET /containers/{ID}/json"] = gone
    scripted.answers[f"DELETE /containers/{ID}"] = gone
    engine = _engine(scripted)
    with pytest.raises(EngineError) as raised:
        await engine.inspect(ID)
    assert raised.value.code == "not_found"
    assert await engine.remove(ID) is True


async def test_any_failed_start_is_start_failed(scripted: Scripted) -> None:
    scripted.answers[f"POST /containers/{ID}/start"] = (400, b'{"message": "exec: nope"}')
    with pytest.raises(RunError) as raised:
        await _engine(scripted).start(ID)
    assert raised.value.code == "start_failed"
    assert "exec: nope" in raised.value.detail


async def test_a_kill_the_engine_refuses_is_not_delivered(scripted: Scripted) -> None:
    scripted.answers[f"POST /containers/{ID}/kill"] = (409, b'{"message": "not running"}')
    assert await _engine(scripted).kill(ID) is False


async def test_cdi_only_where_the_engine_has_switched_it_on(scripted: Scripted) -> None:
    engine = _engine(scripted)
    for answer, cdi in ((b'{"CDISpecDirs": ["/etc/cdi"]}', True), (b'{"CDISpecDirs": []}', False)):
        scripted.answers["GET /info"] = (200, answer)
        assert engine.supports_cdi(await engine.info()) is cdi
    scripted.answers["GET /version"] = (200, b'{"ApiVersion": "1.43"}')
    scripted.answers["GET /info"] = (200, b'{"CDISpecDirs": ["/etc/cdi"]}')
    assert engine.supports_cdi(await engine.info()) is False  # before Docker 25


_HOST_CONFIG = {
    "Privileged": False,
    "CapDrop": ["ALL"],
    "SecurityOpt": [],
    "ReadonlyRootfs": True,
    "Init": True,
    "IpcMode": "private",
    "NetworkMode": "none",
    "Memory": 1,
    "MemorySwap": 1,
    "NanoCpus": 1,
    "PidsLimit": 1,
    "ShmSize": 1,
    "Tmpfs": {},
    "Ulimits": [],
    "Binds": [],
    "Devices": [],
    "DeviceRequests": [],
    "GroupAdd": [],
    "LogConfig": {"Type": "none", "Config": {}},
    "Runtime": "runc",
    "AutoRemove": False,
}


@pytest.mark.parametrize(
    ("route", "answer", "call"),
    [
        ("GET /info", b'{"Runtimes": 3}', lambda e: e.info()),
        ("GET /info", b"[]", lambda e: e.info()),
        ("GET /images/x/json", b'{"Id": 5}', lambda e: e.inspect_image("x")),
        ("GET /images/x/json", b'{"Config": {}}', lambda e: e.inspect_image("x")),
        (
            "GET /images/x/json",
            b'{"Id": "i", "Config": {"Volumes": []}}',
            lambda e: e.inspect_image("x"),
        ),
        (f"GET /containers/{ID}/json", b'{"State": {"ExitCode": "x"}}', lambda e: e.inspect(ID)),
        (f"GET /containers/{ID}/json", b'{"Mounts": []}', lambda e: e.inspect(ID)),
        (f"GET /containers/{ID}/json", b"not json", lambda e: e.inspect(ID)),
        ("GET /containers/json", b'{"Id": "a"}', lambda e: e.containers("k")),
        ("GET /containers/json", b'[{"Id": "a", "Labels": {"k": 1}}]', lambda e: e.containers("k")),
    ],
)
async def test_answers_of_the_wrong_shape_are_engine_errors(
    scripted: Scripted, route: str, answer: bytes, call: Callable[[Engine], Any]
) -> None:
    scripted.answers[route] = (200, answer)
    with pytest.raises(EngineError) as raised:
        await call(_engine(scripted))
    assert raised.value.code == "engine_error"


@pytest.mark.parametrize("version", [b'"x.y"', b'"1"', b"1.44", b'"1.4a"'])
async def test_a_version_that_is_not_one_is_an_engine_error(
    scripted: Scripted, version: bytes
) -> None:
    scripted.answers["GET /version"] = (200, b'{"ApiVersion": %s}' % version)
    with pytest.raises(EngineError) as raised:
        await DockerClient(scripted.path).version()
    assert raised.value.code == "engine_error"


async def test_the_exit_times_read_as_epoch_seconds_or_none(scripted: Scripted) -> None:
    state = {
        "ExitCode": 3,
        "OOMKilled": True,
        "StartedAt": "2024-01-02T03:04:05.123456789Z",
        "FinishedAt": "0001-01-01T00:00:00Z",
    }
    scripted.answers[f"GET /containers/{ID}/json"] = (200, json.dumps({"State": state}).encode())
    info = await _engine(scripted).inspect(ID)
    assert (info.state.exit_code, info.state.oom_killed) == (3, True)
    assert info.state.started == 1704164645.123456
    assert info.state.finished is None
    assert info.volumes == []


async def test_a_malformed_listing_fails_the_reaping_with_a_coded_error(
    scripted: Scripted, tmp_path: Path
) -> None:
    scripted.answers["GET /containers/json"] = (200, b"[1]")
    config = RunnerConfig(jobs_dir=tmp_path / "jobs", cgroup_root=tmp_path / "cgroup")
    with pytest.raises(EngineError) as raised:
        await Runner(DockerClient(scripted.path), config).reap_orphans()
    assert raised.value.code == "engine_error"


async def test_an_image_answer_without_an_id_ends_the_job_with_a_coded_error(
    scripted: Scripted, tmp_path: Path
) -> None:
    spec = load_spec(b'{"image": "x"}', "json")
    scripted.answers[f"GET /images/{quote_ref(spec.image_ref.canonical)}/json"] = (
        200,
        b'{"Config": {}}',
    )
    config = RunnerConfig(
        jobs_dir=tmp_path / "jobs", user="1000:1000", cgroup_root=tmp_path / "cgroup"
    )
    events = [
        event async for event in Runner(DockerClient(scripted.path), config).run("j-1", spec, [])
    ]
    assert isinstance(events[-1], Finished)
    assert (events[-1].result.reason, events[-1].result.error_code) == ("error", "engine_error")
