"""The control socket and its client fed what a well-behaved peer never sends: bursts of
connections, half lines, no reads, no answers, dates past year 9999. Each gets a coded
line or error and a closed connection; the daemon's state does not change."""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from support.control_target import MemoryTarget, short_dir, status

from agent.control.args import add_commands
from agent.control.cli import run_command
from agent.control.client import ControlClient
from agent.control.server import ControlServer
from agent.errors import ControlError


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


@pytest.fixture
async def mute(sock_dir: Path) -> AsyncIterator[Path]:
    """A socket that accepts and never answers."""
    path = sock_dir / "mute.sock"
    hang = asyncio.Event()

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await hang.wait()
        writer.close()

    server = await asyncio.start_unix_server(never, path)
    yield path
    hang.set()
    server.close()
    await server.wait_closed()


async def test_status_to_a_reader_that_went_away_ends_quietly(server: ControlServer) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.cli",
            "status",
            "--socket",
            str(server.path),
            stdout=write_end,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    _, stderr = await process.communicate()
    assert (process.returncode, stderr) == (128 + 13, b"")


# ---------------------------------------------------------------------- timeouts


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--json"],
        ["pause"],
        ["pause", "--drain"],
        ["pause", "--for", "1h"],
        ["resume"],
        ["jobs"],
        ["logs", "job-1"],
        ["logs", "job-1", "--follow"],
    ],
)
async def test_every_control_command_gives_up_on_a_daemon_that_never_answers(
    mute: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = _control_parser().parse_args([*command, "--socket", str(mute), "--timeout", "0.1"])
    assert await asyncio.to_thread(run_command, args) == 1
    assert "gpu-agent: error [timeout]: " in capsys.readouterr().err


async def test_pause_drain_is_paused_at_once_then_waits_for_the_jobs(
    server: ControlServer, target: MemoryTarget
) -> None:
    async with await ControlClient.connect(server.path) as client:
        pausing = asyncio.create_task(client.pause(drain=True, timeout=0.5))
        await target.drain_started.wait()
        assert target.state.paused
        target.drained.set()
        assert (await pausing).paused


def _control_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu-agent")
    add_commands(parser.add_subparsers(dest="command", required=True), argparse.ArgumentParser)
    return parser


# ---------------------------------------------------------------------- the socket: bounded


async def test_a_burst_of_500_connects_is_all_accepted_and_served(
    sock_dir: Path, target: MemoryTarget
) -> None:
    async with ControlServer(target, sock_dir / "agent.sock", max_connections=600) as server:
        socks: list[socket.socket] = []
        try:
            # No await between the connects: the server accepts none of them meanwhile, so
            # all 500 wait in the listening backlog at once.
            for _ in range(500):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                socks.append(sock)
                sock.setblocking(False)
                sock.connect(os.fsencode(server.path))  # BlockingIOError: backlog full
            streams = [await asyncio.open_unix_connection(sock=sock) for sock in socks]
        except BaseException:
            for sock in socks:
                sock.close()
            raise

        async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
            writer.write(b'{"id": 1, "method": "status"}\n')
            await writer.drain()
            line = await reader.readline()
            writer.close()
            await writer.wait_closed()
            return line

        answers = await asyncio.gather(*(ask(*stream) for stream in streams))
    assert all(msgspec.json.decode(line)["result"]["node_id"] == "node-7f3a" for line in answers)


async def _error_then_eof(reader: asyncio.StreamReader) -> str:
    """The code of the one error line the server sent before it closed."""
    line = await reader.readline()
    assert await reader.read() == b""
    frame = msgspec.json.decode(line)
    assert frame["id"] is None
    code: str = frame["error"]["code"]
    return code


async def test_a_request_line_never_finished_is_closed_after_the_line_timeout(
    sock_dir: Path, target: MemoryTarget
) -> None:
    async with ControlServer(target, sock_dir / "agent.sock", line_timeout_s=0.1) as server:
        reader, writer = await asyncio.open_unix_connection(server.path)
        writer.write(b'{"id": 1, "method": "sta')
        assert await _error_then_eof(reader) == "idle_timeout"
        writer.close()
        await writer.wait_closed()


async def test_an_idle_connection_is_closed_but_a_subscribed_one_is_kept(
    sock_dir: Path, target: MemoryTarget
) -> None:
    async with (
        ControlServer(target, sock_dir / "agent.sock", idle_timeout_s=0.1) as server,
        await ControlClient.connect(server.path) as subscriber,
    ):
        states = subscriber.subscribe()
        assert (await anext(states)).node_id == "node-7f3a"
        reader, writer = await asyncio.open_unix_connection(server.path)
        assert await _error_then_eof(reader) == "idle_timeout"
        writer.close()
        await writer.wait_closed()
        # The subscriber waited as long as the idle one, and is still served.
        server.publish(status(paused=True))
        assert (await anext(states)).paused
        await states.aclose()


async def test_a_client_that_reads_none_of_its_answers_is_dropped(
    sock_dir: Path, target: MemoryTarget
) -> None:
    requests = 5000  # answers far past what the socket buffers hold
    loop = asyncio.get_running_loop()
    async with ControlServer(target, sock_dir / "agent.sock", idle_timeout_s=0.1) as server:
        # A bare socket: an asyncio stream would read (buffer) the answers by itself.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, os.fsencode(server.path))
            await loop.sock_sendall(sock, b'{"id": 1, "method": "status"}\n' * requests)
            await asyncio.to_thread(_wait_for_hangup, sock)
            # Read only now that the server gave up on us: what it sent before, then EOF.
            answered = 0
            while data := await loop.sock_recv(sock, 1 << 16):
                answered += data.count(b"\n")
    assert answered < requests


def _wait_for_hangup(sock: socket.socket) -> None:
    """Until the peer closes its end; what it sent is left unread."""
    poll = select.poll()
    poll.register(sock, select.POLLRDHUP)
    # Bounded, so that a server that never hangs up fails the test instead of leaving a
    # thread that blocks the interpreter's exit.
    assert poll.poll(60_000), "the server kept the connection"


async def test_connections_past_the_cap_get_a_coded_line_and_are_closed(
    sock_dir: Path, target: MemoryTarget
) -> None:
    async with (
        ControlServer(target, sock_dir / "agent.sock", max_connections=2) as server,
        await ControlClient.connect(server.path) as first,
        await ControlClient.connect(server.path) as second,
    ):
        assert (await first.status()).node_id == (await second.status()).node_id
        async with await ControlClient.connect(server.path) as third:
            with pytest.raises(ControlError) as caught:
                await third.status()
        assert caught.value.code == "too_many_connections"
        assert (await first.status()).node_id == "node-7f3a"


# ---------------------------------------------------------------------- pause until


@pytest.mark.parametrize("until", [1e20, 253402300800.0, -1.0])
async def test_a_pause_no_date_can_show_is_refused_and_changes_nothing(
    server: ControlServer, target: MemoryTarget, until: float
) -> None:
    async with await ControlClient.connect(server.path) as client:
        with pytest.raises(ControlError) as caught:
            await client.pause(until=until)
        assert caught.value.code == "bad_params"
        assert not (await client.status()).paused
    assert not target.state.paused


async def test_a_subscriber_that_reads_no_state_is_dropped(
    sock_dir: Path, target: MemoryTarget
) -> None:
    loop = asyncio.get_running_loop()
    async with ControlServer(target, sock_dir / "agent.sock", idle_timeout_s=0.1) as server:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, os.fsencode(server.path))
            await loop.sock_sendall(sock, b'{"id": 1, "method": "subscribe"}\n')
            states = 0
            while not states:  # until it is subscribed: the first state came
                states = (await loop.sock_recv(sock, 1 << 16)).count(b'"event"')
            # States far past what the socket buffers hold, one at a time (a subscriber
            # gets only the latest of those published while it is still sending one).
            for node in range(200):
                server.publish(status(node_id=f"node-{node}-{'x' * 8192}"))
                await asyncio.sleep(0)
            await asyncio.to_thread(_wait_for_hangup, sock)


# ---------------------------------------------------------------------- JSON nested too deeply

_DEEP = b"[" * 30_000 + b"]" * 30_000  # under the 64 KiB of a request line


async def test_a_request_nested_too_deeply_is_bad_json_and_the_connection_stays_usable(
    server: ControlServer,
) -> None:
    reader, writer = await asyncio.open_unix_connection(server.path)
    writer.write(_DEEP + b"\n" + b'{"id": 2, "method": "status"}\n')
    refused = msgspec.json.decode(await reader.readline())
    assert refused["error"]["code"] == "bad_json"
    assert msgspec.json.decode(await reader.readline())["id"] == 2
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize("field", [b"result", b"data"])
async def test_an_answer_nested_too_deeply_is_a_bad_response(sock_dir: Path, field: bytes) -> None:
    answer = b'{"id": 1, "' + field + b'": ' + _DEEP + b"}\n"

    async def deep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(deep, sock_dir / "deep.sock")
    async with server, await ControlClient.connect(sock_dir / "deep.sock") as client:
        with pytest.raises(ControlError) as caught:
            await client.call("status")
        assert caught.value.code == "bad_response"


async def test_a_request_with_no_json_form_is_refused_before_it_is_sent(
    server: ControlServer,
) -> None:
    async with await ControlClient.connect(server.path) as client:
        with pytest.raises(ControlError) as caught:
            async for _ in client.logs("\udcff"):
                pass
        assert caught.value.code == "bad_request"
        with pytest.raises(ControlError) as caught:
            await client.call("set_settings", {"changes": {"idle_delay_s": object()}})
        assert caught.value.code == "bad_request"
        assert (await client.status()).node_id == "node-7f3a"
