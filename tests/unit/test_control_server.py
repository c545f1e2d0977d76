"""The control API server on a real unix socket: methods, bad input, events, the socket file."""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.control_target import MemoryTarget, connect_as, job, short_dir, status

from agent.control.client import ControlClient
from agent.control.server import ControlServer
from agent.control.wire import MAX_REQUEST_BYTES, LogChunkView, StatusView
from agent.errors import ControlError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="takes another uid for a moment")
NOBODY = 65534


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


@pytest.fixture
def target() -> MemoryTarget:
    return MemoryTarget()


@pytest.fixture
async def server(sock_dir: Path, target: MemoryTarget) -> AsyncIterator[ControlServer]:
    async with ControlServer(target, sock_dir / "agent.sock") as running:
        yield running


class Raw:
    """A client that speaks bytes, to send what a real client never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: Path) -> Raw:
        return cls(*await asyncio.open_unix_connection(path, limit=2**24))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def line(self) -> dict[str, Any]:
        line = await self.reader.readline()
        assert line.endswith(b"\n"), line
        decoded: dict[str, Any] = msgspec.json.decode(line)
        return decoded

    async def ask(self, data: bytes) -> dict[str, Any]:
        await self.send(data)
        return await self.line()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
async def raw(server: ControlServer) -> AsyncIterator[Raw]:
    client = await Raw.open(server.path)
    yield client
    await client.close()


@pytest.fixture
async def client(server: ControlServer) -> AsyncIterator[ControlClient]:
    async with await ControlClient.connect(server.path) as connected:
        yield connected


# ---------------------------------------------------------------------- methods


async def test_status_answers_the_daemons_view(raw: Raw, target: MemoryTarget) -> None:
    answer = await raw.ask(b'{"id": 1, "method": "status", "params": {}}\n')
    assert answer["id"] == 1
    assert msgspec.convert(answer["result"], StatusView) == target.state


async def test_params_may_be_left_out_and_ids_may_be_strings(raw: Raw) -> None:
    answer = await raw.ask(b'{"id": "a-1", "method": "status"}\n')
    assert answer["id"] == "a-1"
    assert answer["result"]["node_id"] == "node-7f3a"


async def test_pause_then_resume(client: ControlClient, target: MemoryTarget) -> None:
    paused = await client.pause()
    assert (paused.paused, paused.pause_reason, paused.draining) == (True, "by the owner", False)
    assert target.state.paused
    resumed = await client.resume()
    assert not resumed.paused
    assert not target.state.paused


async def test_pause_with_drain_answers_once_running_jobs_have_ended(
    server: ControlServer, target: MemoryTarget
) -> None:
    async with await ControlClient.connect(server.path) as client:
        pausing = asyncio.create_task(client.pause(drain=True))
        await target.drain_started.wait()
        async with await ControlClient.connect(server.path) as other:
            meanwhile = await other.status()
        assert (meanwhile.paused, meanwhile.draining) == (True, True)
        assert not pausing.done()
        target.drained.set()
        drained = await pausing
    assert (drained.paused, drained.draining, drained.jobs) == (True, False, [])


async def test_jobs_are_the_newest_up_to_the_limit(client: ControlClient) -> None:
    assert [j.job_id for j in await client.jobs(limit=5)] == ["job-2", "job-1"]
    assert await client.jobs(limit=1) == [job("job-2", "running")]


async def test_logs_are_the_stored_chunks_then_the_job(
    client: ControlClient, target: MemoryTarget
) -> None:
    target.log("job-1", "stdout", "hello\n")
    target.log("job-1", "stderr", "warning\n")
    received = [item async for item in client.logs("job-1")]
    assert received == [
        LogChunkView(stream="stdout", data="hello\n"),
        LogChunkView(stream="stderr", data="warning\n"),
        job("job-1", "completed", exit_code=0),
    ]
    assert (await client.status()).node_id == "node-7f3a"  # the connection is still in step


async def test_logs_follow_streams_new_chunks_until_the_job_ends(
    client: ControlClient, target: MemoryTarget
) -> None:
    target.log("job-2", "stdout", "epoch 1\n")
    stream = client.logs("job-2", follow=True)
    assert await anext(stream) == LogChunkView(stream="stdout", data="epoch 1\n")
    target.log("job-2", "stdout", "epoch 2\n")
    assert await anext(stream) == LogChunkView(stream="stdout", data="epoch 2\n")
    target.log("job-2", "stdout", "done\n")
    target.end("job-2", exit_code=3)
    assert await anext(stream) == LogChunkView(stream="stdout", data="done\n")
    final = await anext(stream)
    assert final == job("job-2", "completed", exit_code=3)
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_logs_of_an_unknown_job_is_a_coded_error(client: ControlClient) -> None:
    with pytest.raises(ControlError) as caught:
        [item async for item in client.logs("job-404")]
    assert caught.value.code == "unknown_job"
    assert "job-404" in caught.value.detail
    assert len(await client.jobs()) == 2


async def test_logs_are_sent_as_events_with_the_request_id(raw: Raw, target: MemoryTarget) -> None:
    target.log("job-1", "stdout", "x")
    await raw.send(b'{"id": 9, "method": "logs", "params": {"job_id": "job-1"}}\n')
    assert await raw.line() == {
        "id": 9,
        "event": "log",
        "data": {"stream": "stdout", "data": "x"},
    }
    assert (await raw.line())["result"]["job_id"] == "job-1"


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("line", "answer_id", "code", "message"),
    [
        (b"{not json\n", None, "bad_json", "not JSON"),
        (b"\xff\xfe\n", None, "bad_json", "not JSON"),
        (b"[1, 2]\n", None, "bad_request", "a request is a JSON object"),
        (b'{"id": 4}\n', 4, "bad_request", "method"),
        (b'{"id": true, "method": "status"}\n', None, "bad_request", "id"),
        (b'{"id": 4, "method": "status", "extra": 1}\n', 4, "bad_request", "extra"),
        (b'{"id": 4, "method": "frobnicate"}\n', 4, "unknown_method", "frobnicate"),
        (b'{"id": 4, "method": "jobs", "params": {"limit": 0}}\n', 4, "bad_params", ">= 1"),
        (b'{"id": 4, "method": "jobs", "params": {"limit": "x"}}\n', 4, "bad_params", "int"),
        (b'{"id": 4, "method": "status", "params": {"verbose": 1}}\n', 4, "bad_params", "verbose"),
        (b'{"id": 4, "method": "logs", "params": {}}\n', 4, "bad_params", "job_id"),
        (b'{"id": 4, "method": "logs", "params": []}\n', 4, "bad_request", "params"),
    ],
)
async def test_bad_request_gets_a_coded_error_and_the_connection_stays_usable(
    raw: Raw, line: bytes, answer_id: object, code: str, message: str
) -> None:
    answer = await raw.ask(line)
    assert answer["id"] == answer_id
    assert answer["error"]["code"] == code
    assert message in answer["error"]["message"]
    assert "result" not in answer
    assert (await raw.ask(b'{"id": 5, "method": "status"}\n'))["id"] == 5


async def test_overlong_line_is_refused_and_skipped_to_its_newline(raw: Raw) -> None:
    huge = b'{"id": 1, "method": "status", "pad": "' + b"x" * MAX_REQUEST_BYTES + b'"}\n'
    answer = await raw.ask(huge + b'{"id": 2, "method": "status"}\n')
    assert answer == {
        "id": None,
        "error": {
            "code": "line_too_long",
            "message": f"a request line is at most {MAX_REQUEST_BYTES} bytes",
        },
    }
    assert (await raw.line())["id"] == 2


async def test_blank_lines_are_ignored_and_a_last_line_without_newline_is_answered(
    raw: Raw,
) -> None:
    await raw.send(b'\n  \n{"id": 1, "method": "status"}')
    raw.writer.write_eof()
    assert (await raw.line())["id"] == 1
    assert await raw.reader.read() == b""


async def test_a_failing_daemon_method_is_an_internal_error_not_a_dropped_socket(
    raw: Raw, target: MemoryTarget, caplog: pytest.LogCaptureFixture
) -> None:
    target.fail_status = True
    answer = await raw.ask(b'{"id": 1, "method": "status"}\n')
    assert answer["error"] == {
        "code": "internal_error",
        "message": "status failed; the agent's log says why",
    }
    assert "the daemon's bug" in caplog.text
    assert (await raw.ask(b'{"id": 2, "method": "jobs"}\n'))["id"] == 2


# ---------------------------------------------------------------------- subscribe


async def test_subscribe_sends_the_state_at_once_then_each_change(
    raw: Raw, server: ControlServer, target: MemoryTarget
) -> None:
    assert await raw.ask(b'{"id": 1, "method": "subscribe"}\n') == {"id": 1, "result": None}
    first = await raw.line()
    assert first["event"] == "state"
    assert msgspec.convert(first["data"], StatusView) == target.state
    server.publish(status(connection="offline"))
    assert (await raw.line())["data"]["connection"] == "offline"


async def test_a_burst_of_changes_reaches_a_subscriber_as_the_last_one(
    raw: Raw, server: ControlServer
) -> None:
    await raw.ask(b'{"id": 1, "method": "subscribe"}\n')
    await raw.line()
    for depth in range(100):
        server.publish(status(outbox_depth=depth))
    assert (await raw.line())["data"]["outbox_depth"] == 99
    server.publish(status(outbox_depth=99))  # no change: no event
    server.publish(status(outbox_depth=100))
    assert (await raw.line())["data"]["outbox_depth"] == 100


async def test_a_subscriber_that_never_reads_holds_back_nobody(server: ControlServer) -> None:
    stuck = await Raw.open(server.path)
    await stuck.send(b'{"id": 1, "method": "subscribe"}\n')
    watcher = await Raw.open(server.path)
    await watcher.ask(b'{"id": 1, "method": "subscribe"}\n')
    await watcher.line()
    gpus = status().gpus * 200  # a large state fills the stuck socket's buffers quickly
    for depth in range(2000):
        server.publish(status(outbox_depth=depth, gpus=gpus))
        await asyncio.sleep(0)
    last = None
    while last != 1999:
        last = (await watcher.line())["data"]["outbox_depth"]
    async with await ControlClient.connect(server.path) as client:
        assert (await client.status()).node_id == "node-7f3a"
    await stuck.close()
    await watcher.close()


async def test_a_subscribed_connection_still_answers_calls(raw: Raw, server: ControlServer) -> None:
    await raw.ask(b'{"id": 1, "method": "subscribe"}\n')
    await raw.line()
    assert (await raw.ask(b'{"id": 2, "method": "jobs", "params": {"limit": 1}}\n'))["id"] == 2


async def test_client_subscribe_yields_states(
    client: ControlClient, server: ControlServer, target: MemoryTarget
) -> None:
    states = client.subscribe()
    assert await anext(states) == target.state
    server.publish(status(paused=True, pause_reason="thermal: GPU 0 at 91 °C"))
    assert (await anext(states)).pause_reason == "thermal: GPU 0 at 91 °C"
    with pytest.raises(ControlError) as caught:
        await client.status()
    assert caught.value.code == "bad_request"


async def test_subscribers_are_told_the_daemon_went_away(
    client: ControlClient, server: ControlServer
) -> None:
    states = client.subscribe()
    await anext(states)
    await server.close()
    with pytest.raises(ControlError) as caught:
        await anext(states)
    assert caught.value.code == "connection_lost"


# ---------------------------------------------------------------------- the socket file


async def test_socket_is_created_0660_in_the_daemons_group(server: ControlServer) -> None:
    info = os.stat(server.path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == os.getegid()


@needs_root
async def test_socket_mode_and_group_are_configurable(sock_dir: Path, target: MemoryTarget) -> None:
    group = grp.getgrgid(100).gr_name
    path = sock_dir / "agent.sock"
    async with ControlServer(target, path, mode=0o600, group=group):
        info = os.stat(path)
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o600, 100)


async def test_a_group_that_does_not_exist_is_refused(sock_dir: Path, target: MemoryTarget) -> None:
    server = ControlServer(target, sock_dir / "agent.sock", group="no-such-group-here")
    with pytest.raises(ControlError) as caught:
        await server.start()
    assert caught.value.code == "unknown_group"
    assert "groupadd" in caught.value.fix
    assert not (sock_dir / "agent.sock").exists()


async def test_stale_socket_of_a_dead_daemon_is_replaced(
    sock_dir: Path, target: MemoryTarget
) -> None:
    path = sock_dir / "agent.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fsencode(path))
    dead.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    async with ControlServer(target, path), await ControlClient.connect(path) as client:
        assert (await client.status()).node_id == "node-7f3a"


async def test_a_second_daemon_on_the_same_socket_is_refused(
    server: ControlServer, target: MemoryTarget
) -> None:
    with pytest.raises(ControlError) as caught:
        await ControlServer(target, server.path).start()
    assert caught.value.code == "socket_in_use"
    async with await ControlClient.connect(server.path) as client:
        assert (await client.status()).node_id == "node-7f3a"


async def test_a_socket_someone_else_answers_on_is_left_alone(
    sock_dir: Path, target: MemoryTarget
) -> None:
    path = sock_dir / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(os.fsencode(path))
        other.listen()
        with pytest.raises(ControlError) as caught:
            await ControlServer(target, path).start()
        assert caught.value.code == "socket_in_use"
        assert os.lstat(path).st_ino == os.stat(path).st_ino


async def test_a_file_that_is_not_a_socket_is_not_replaced(
    sock_dir: Path, target: MemoryTarget
) -> None:
    path = sock_dir / "agent.sock"
    path.write_text("mine")
    with pytest.raises(ControlError) as caught:
        await ControlServer(target, path).start()
    assert caught.value.code == "bad_socket_path"
    assert path.read_text() == "mine"


async def test_a_path_too_long_for_a_socket_is_refused(
    sock_dir: Path, target: MemoryTarget
) -> None:
    with pytest.raises(ControlError) as caught:
        await ControlServer(target, sock_dir / ("x" * 120) / "agent.sock").start()
    assert caught.value.code == "bad_socket_path"


async def test_close_removes_the_socket_and_a_new_daemon_can_start(
    sock_dir: Path, target: MemoryTarget
) -> None:
    path = sock_dir / "run" / "agent.sock"
    async with ControlServer(target, path):
        assert path.exists()
    assert not path.exists()
    async with ControlServer(target, path), await ControlClient.connect(path) as client:
        assert (await client.status()).node_id == "node-7f3a"


# ---------------------------------------------------------------------- who may connect


@needs_root
@pytest.mark.parametrize(
    ("gid", "groups", "allowed"),
    [
        (NOBODY, [], False),
        (NOBODY, [100], True),  # a supplementary member of the socket's group
        (100, [], True),  # the socket's group is the primary one
    ],
)
async def test_another_user_needs_the_sockets_group(
    sock_dir: Path, target: MemoryTarget, gid: int, groups: list[int], allowed: bool
) -> None:
    sock_dir.chmod(0o755)
    path = sock_dir / "agent.sock"
    # World-writable, so that the file's mode lets everyone through and the peer check
    # is all that decides.
    async with ControlServer(target, path, mode=0o666, group=grp.getgrgid(100).gr_name):
        sock = connect_as(path, NOBODY, gid, groups)
        peer = Raw(*await asyncio.open_unix_connection(sock=sock, limit=2**24))
        answer = await peer.ask(b'{"id": 1, "method": "status"}\n')
        if allowed:
            assert answer["result"]["node_id"] == "node-7f3a"
        else:
            assert answer["id"] is None
            assert answer["error"]["code"] == "permission_denied"
            assert f"uid {NOBODY} is not root" in answer["error"]["message"]
            assert await peer.reader.read() == b""
        await peer.close()
