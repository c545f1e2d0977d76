"""The control API client: reaching the daemon, its errors and fixes, re-subscribing."""

from __future__ import annotations

import asyncio
import grp
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from support.control_target import MemoryTarget, as_user, connect_as, short_dir, status

from agent.control import client as control_client
from agent.control.client import (
    GROUP_FIX,
    START_FIX,
    ControlClient,
    call_sync,
    default_socket_path,
    user_socket_path,
    watch,
)
from agent.control.server import ControlServer
from agent.control.wire import StatusView
from agent.errors import ControlError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="takes another uid for a moment")
NOBODY = 65534
Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


@pytest.fixture
async def server(sock_dir: Path) -> AsyncIterator[ControlServer]:
    async with ControlServer(MemoryTarget(), sock_dir / "agent.sock") as running:
        yield running


async def _scripted(path: Path, answer: Answer) -> asyncio.Server:
    """A daemon that answers every connection with ``answer``, to misbehave on purpose."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer(reader, writer)
        writer.close()
        await writer.wait_closed()

    return await asyncio.start_unix_server(serve, path)


async def test_missing_socket_means_the_daemon_is_not_running(sock_dir: Path) -> None:
    with pytest.raises(ControlError) as caught:
        await ControlClient.connect(sock_dir / "agent.sock")
    assert caught.value.code == "daemon_not_running"
    assert caught.value.fix == START_FIX == "start the service: systemctl start gpu-agent"


async def test_socket_nobody_listens_on_means_the_daemon_is_not_running(sock_dir: Path) -> None:
    path = sock_dir / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(os.fsencode(path))
    with pytest.raises(ControlError) as caught:
        await ControlClient.connect(path)
    assert (caught.value.code, caught.value.fix) == ("daemon_not_running", START_FIX)


@needs_root
async def test_a_socket_you_may_not_open_says_which_group_to_join(sock_dir: Path) -> None:
    sock_dir.chmod(0o755)
    path = sock_dir / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(os.fsencode(path))
        path.chmod(0o660)
        listener.listen()
        with pytest.raises(ControlError) as caught, as_user(NOBODY, NOBODY, []):
            await ControlClient.connect(path)
    assert caught.value.code == "permission_denied"
    assert caught.value.fix.startswith("join the group: sudo usermod -aG gpu-agent $USER")
    assert caught.value.fix == GROUP_FIX


@needs_root
async def test_a_peer_the_daemon_refuses_is_told_which_group_to_join(sock_dir: Path) -> None:
    sock_dir.chmod(0o755)
    path = sock_dir / "agent.sock"
    group = grp.getgrgid(100).gr_name
    async with ControlServer(MemoryTarget(), path, mode=0o666, group=group):
        reader, writer = await asyncio.open_unix_connection(
            sock=connect_as(path, NOBODY, NOBODY, [])
        )
        async with ControlClient(path, reader, writer) as client:
            with pytest.raises(ControlError) as caught:
                await client.status()
    assert (caught.value.code, caught.value.fix) == ("permission_denied", GROUP_FIX)


async def test_call_returns_plain_json_values(server: ControlServer) -> None:
    async with await ControlClient.connect(server.path) as client:
        jobs = await client.call("jobs", {"limit": 1})
        assert [j["job_id"] for j in jobs] == ["job-2"]
        with pytest.raises(ControlError) as caught:
            await client.call("jobs", {"limit": -1})
        assert caught.value.code == "bad_params"
        assert (await client.call("status"))["node_id"] == "node-7f3a"


async def test_call_sync_works_without_an_event_loop(server: ControlServer) -> None:
    result = await asyncio.to_thread(call_sync, server.path, "status")
    assert msgspec.convert(result, StatusView) == status()


async def test_no_answer_in_time_is_a_timeout_and_ends_the_connection(sock_dir: Path) -> None:
    path = sock_dir / "agent.sock"
    hang = asyncio.Event()

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await hang.wait()

    async with await _scripted(path, never), await ControlClient.connect(path) as client:
        with pytest.raises(ControlError) as caught:
            await client.status(timeout=0.01)
        assert caught.value.code == "timeout"
        with pytest.raises(ControlError) as caught:
            await client.status()
        assert caught.value.code == "connection_lost"
        hang.set()


@pytest.mark.parametrize(
    "answer",
    [
        b"hello\n",
        b'{"id": 1, "result": {"node_id": 7}}\n',
        b'{"id": 2, "result": null}\n',
        b'{"id": 1, "result": null, "surprise": true}\n',
    ],
)
async def test_an_answer_the_client_cannot_read_is_a_bad_response(
    sock_dir: Path, answer: bytes
) -> None:
    path = sock_dir / "agent.sock"

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(answer)
        await reader.read()

    async with await _scripted(path, reply), await ControlClient.connect(path) as client:
        with pytest.raises(ControlError) as caught:
            await client.status()
    assert caught.value.code == "bad_response"


async def test_a_daemon_that_hangs_up_mid_call_is_a_lost_connection(sock_dir: Path) -> None:
    path = sock_dir / "agent.sock"

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()

    async with await _scripted(path, hang_up), await ControlClient.connect(path) as client:
        with pytest.raises(ControlError) as caught:
            await client.jobs()
    assert caught.value.code == "connection_lost"


async def test_leaving_a_log_stream_early_ends_the_connection(server: ControlServer) -> None:
    target = server.target
    assert isinstance(target, MemoryTarget)
    target.log("job-2", "stdout", "one\n")
    async with await ControlClient.connect(server.path) as client:
        async for _chunk in client.logs("job-2", follow=True):
            break
        with pytest.raises(ControlError) as caught:
            await client.status()
    assert caught.value.code == "connection_lost"


async def test_watch_resubscribes_after_the_daemon_restarts(sock_dir: Path) -> None:
    path = sock_dir / "agent.sock"
    first, second = MemoryTarget(), MemoryTarget()
    second.state = status(node_id="node-after-restart")
    states = watch(path, retry_initial_s=0.001, retry_max_s=0.001)
    async with ControlServer(first, path):
        assert await anext(states) == first.state
    lost = await anext(states)
    assert isinstance(lost, ControlError)
    assert lost.code == "connection_lost"
    gone = await anext(states)
    assert isinstance(gone, ControlError)
    assert (gone.code, gone.fix) == ("daemon_not_running", START_FIX)
    async with ControlServer(second, path) as restarted:
        item = await anext(states)
        while isinstance(item, ControlError):
            assert item.code == "daemon_not_running"
            item = await anext(states)
        assert item == second.state
        restarted.publish(status(node_id="node-after-restart", paused=True))
        assert await anext(states) == status(node_id="node-after-restart", paused=True)
    await states.aclose()


def test_default_socket_is_the_system_one_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "run" / "gpu-agent" / "agent.sock"
    monkeypatch.setattr(control_client, "SYSTEM_SOCKET", system)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "user"))
    assert default_socket_path() == user_socket_path() == tmp_path / "user/gpu-agent/agent.sock"
    system.parent.mkdir(parents=True)
    system.touch()
    assert default_socket_path() == system


def test_user_socket_without_a_runtime_dir_is_still_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert user_socket_path().name == "agent.sock"
