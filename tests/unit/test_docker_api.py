"""The Docker client's HTTP handling, against a scripted server on a real unix socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from sandbox.docker_api import DockerClient
from sandbox.errors import EngineError

_VERSION_BODY = b'{"ApiVersion": "1.44", "Version": "25"}'
VERSION = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(_VERSION_BODY), _VERSION_BODY)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Callable[[bytes], str]]:
    """A fake engine: answers /version, and every other request with the scripted bytes."""
    answers: list[bytes] = []
    path = str(tmp_path / "docker.sock")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        writer.write(VERSION if b"/version" in request.split(b"\r\n")[0] else answers[0])
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, path)

    def script(answer: bytes) -> str:
        answers[:] = [answer]
        return path

    async with server:
        yield script


async def test_chunked_answer_is_reassembled(engine: Callable[[bytes], str]) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n[1, \r\n2\r\n2]\r\n0\r\n\r\n"
    client = DockerClient(engine(raw))
    assert (await client.request("GET", "/containers/json")).json() == [1, 2]


async def test_a_refusal_is_an_engine_error_with_its_status_and_message(
    engine: Callable[[bytes], str],
) -> None:
    # What a status means for each operation is sandbox.engine's (tests/integration/test_engine.py).
    body = b'{"message": "No such image: nope:latest"}'
    raw = b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    client = DockerClient(engine(raw))
    with pytest.raises(EngineError) as raised:
        await client.request("GET", "/images/nope/json")
    assert (raised.value.code, raised.value.status) == ("engine_error", 404)
    assert raised.value.detail == "Docker answered 404: No such image: nope:latest"


@pytest.mark.parametrize(
    "raw",
    [
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
    ],
)
async def test_garbled_answers_are_engine_errors(
    engine: Callable[[bytes], str], raw: bytes
) -> None:
    client = DockerClient(engine(raw))
    with pytest.raises(EngineError) as raised:
        await client.request("GET", "/info")
    assert raised.value.code == "engine_error"


async def test_answer_that_is_not_json_is_an_engine_error(engine: Callable[[bytes], str]) -> None:
    client = DockerClient(engine(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{{{"))
    with pytest.raises(EngineError):
        (await client.request("GET", "/info")).json()


async def test_no_engine_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(EngineError) as raised:
        await DockerClient(str(tmp_path / "absent.sock")).version()
    assert raised.value.code == "engine_unreachable"
