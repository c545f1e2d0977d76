"""Fetching inputs by URL from a real HTTP server on 127.0.0.1, honest and hostile."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.input_server import InputServer, serve_input
from support.tls import ServerTls, make_server_tls

from agent.errors import InputError
from agent.inputs.fetch import FetchLimits, fetch
from agent.inputs.sink import BUFFER_BYTES, BUFFERS

DATA = os.urandom(300_000)
# More than all of a sink's buffers: the receiver has to wait for the disk.
LARGE = os.urandom(BUFFERS * BUFFER_BYTES + 12345)
LIMITS = FetchLimits(stall_s=0.5, deadline_s=30.0, max_redirects=3)


@pytest.fixture
def server() -> Iterator[InputServer]:
    with serve_input(DATA) as running:
        yield running


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> ServerTls:
    return make_server_tls(tmp_path_factory.mktemp("tls"))


async def _fetch(
    url: str,
    out: Path,
    *,
    sha256: str,
    size: int = len(DATA),
    hosts: tuple[str, ...] = ("127.0.0.1",),
    limits: FetchLimits = LIMITS,
    tls: ServerTls | None = None,
) -> bytes:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    context = None if tls is None else ssl.create_default_context(cafile=str(tls.ca_file))
    try:
        await fetch(
            url,
            fd,
            sha256=sha256,
            size_bytes=size,
            allowed_hosts=list(hosts),
            limits=limits,
            context=context,
        )
    finally:
        os.close(fd)
    return out.read_bytes()


async def test_a_file_with_its_digest_and_size_is_fetched_whole(
    server: InputServer, tmp_path: Path
) -> None:
    got = await _fetch(server.url("/file"), tmp_path / "f", sha256=server.sha256)
    assert got == DATA


@pytest.mark.parametrize(
    ("path", "size", "code"),
    [
        ("/wrong", len(DATA), "input_digest_mismatch"),
        ("/file", len(DATA) + 1, "input_digest_mismatch"),  # fewer bytes than announced
        ("/more", len(DATA), "input_too_large"),
        ("/more-unannounced", len(DATA), "input_too_large"),
        ("/chunked-more", len(DATA), "input_too_large"),
        ("/early-close", len(DATA), "input_unreachable"),
        ("/chunked-early-close", len(DATA), "input_unreachable"),
        ("/endless", len(DATA), "input_too_large"),
        ("/stall", len(DATA), "input_timeout"),
        ("/status/404", len(DATA), "input_not_found"),
        ("/status/500", len(DATA), "input_http_error"),
        ("/status/206", len(DATA), "input_http_error"),
        ("/status/200", len(DATA), "input_digest_mismatch"),  # a 200 with nothing in it
    ],
)
async def test_a_hostile_server_is_refused_with_a_code(
    server: InputServer, tmp_path: Path, path: str, size: int, code: str
) -> None:
    with pytest.raises(InputError) as caught:
        await _fetch(server.url(path), tmp_path / "f", sha256=server.sha256, size=size)
    assert caught.value.code == code


@pytest.mark.parametrize("path", ["/file", "/chunked"])
@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
async def test_a_body_larger_than_the_buffers_is_fetched_whole_over_http_and_https(
    tmp_path: Path, tls: ServerTls, path: str, https: bool
) -> None:
    with serve_input(LARGE, tls=tls if https else None) as large:
        got = await _fetch(
            large.url(path),
            tmp_path / "f",
            sha256=large.sha256,
            size=len(LARGE),
            tls=tls if https else None,
        )
    assert got == LARGE


@pytest.mark.parametrize("path", ["/file", "/chunked"])
@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
async def test_what_a_server_sent_before_it_closed_is_all_taken_while_the_disk_is_behind(
    tls: ServerTls, path: str, https: bool
) -> None:
    # The receiver stops with three buffers out and half of one left on the wire.
    body = LARGE[: (BUFFERS - 2) * BUFFER_BYTES + BUFFER_BYTES // 2]
    read_end, write_end = os.pipe()  # a disk that takes nothing until the server has closed
    with serve_input(body, tls=tls if https else None) as server:

        def drain() -> bytes:
            server.closed.wait(timeout=30)  # (a fallback only: the server is not that slow)
            with open(read_end, "rb") as reader:
                return reader.read()

        drained = asyncio.create_task(asyncio.to_thread(drain))
        try:
            await fetch(
                server.url(path),
                write_end,
                sha256=server.sha256,
                size_bytes=len(body),
                allowed_hosts=["127.0.0.1"],
                limits=FetchLimits(stall_s=60.0, deadline_s=120.0),
                context=ssl.create_default_context(cafile=str(tls.ca_file)),
            )
        finally:
            os.close(write_end)
            server.closed.set()
        assert await drained == body


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/more", "input_too_large"),
        ("/more-unannounced", "input_too_large"),
        ("/chunked-more", "input_too_large"),
        ("/wrong", "input_digest_mismatch"),
        ("/early-close", "input_unreachable"),
        ("/stall", "input_timeout"),
    ],
)
async def test_a_hostile_https_server_is_refused_with_a_code(
    tmp_path: Path, tls: ServerTls, path: str, code: str
) -> None:
    with serve_input(LARGE, tls=tls) as large, pytest.raises(InputError) as caught:
        await _fetch(large.url(path), tmp_path / "f", sha256=large.sha256, size=len(LARGE), tls=tls)
    assert caught.value.code == code


async def test_https_with_a_certificate_not_from_a_trusted_ca_is_unreachable(
    tmp_path: Path, tls: ServerTls
) -> None:
    with serve_input(DATA, tls=tls) as untrusted:
        with pytest.raises(InputError) as caught:
            await _fetch(untrusted.url("/file"), tmp_path / "f", sha256=untrusted.sha256)
        assert untrusted.hits["/file"] == 0
    assert caught.value.code == "input_unreachable"


async def test_https_with_a_certificate_for_another_host_is_unreachable(
    tmp_path: Path, tls: ServerTls
) -> None:
    with serve_input(DATA, tls=tls) as server:
        url = server.url("/file").replace("127.0.0.1", "localhost")  # the certificate's: IP
        with pytest.raises(InputError) as caught:
            await _fetch(url, tmp_path / "f", sha256=server.sha256, hosts=("localhost",), tls=tls)
        assert server.hits["/file"] == 0
    assert caught.value.code == "input_unreachable"


async def test_bytes_past_the_announced_length_are_never_taken(
    server: InputServer, tmp_path: Path
) -> None:
    got = await _fetch(server.url("/more-than-announced"), tmp_path / "f", sha256=server.sha256)
    assert got == DATA


async def test_a_chunked_body_is_fetched_whole(server: InputServer, tmp_path: Path) -> None:
    assert await _fetch(server.url("/chunked"), tmp_path / "f", sha256=server.sha256) == DATA


@pytest.mark.parametrize("path", ["/file", "/chunked"])
async def test_progress_grows_to_the_whole_size(tmp_path: Path, path: str) -> None:
    seen: list[int] = []
    with serve_input(LARGE) as large:
        fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            await fetch(
                large.url(path),
                fd,
                sha256=large.sha256,
                size_bytes=len(LARGE),
                allowed_hosts=["127.0.0.1"],
                limits=LIMITS,
                progress=seen.append,
            )
        finally:
            os.close(fd)
    assert len(seen) > 1
    assert seen == sorted(seen)
    assert seen[-1] == len(LARGE)


async def test_a_disk_that_fills_up_mid_fetch_is_disk_full(server: InputServer) -> None:
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(InputError) as caught:
            await fetch(
                server.url("/file"),
                fd,
                sha256=hashlib.sha256(DATA).hexdigest(),
                size_bytes=len(DATA),
                allowed_hosts=["127.0.0.1"],
                limits=LIMITS,
            )
    finally:
        os.close(fd)
    assert caught.value.code == "disk_full"


async def test_a_body_trickled_past_the_deadline_is_refused(
    server: InputServer, tmp_path: Path
) -> None:
    limits = FetchLimits(stall_s=30.0, deadline_s=0.3)
    with pytest.raises(InputError) as caught:
        await _fetch(server.url("/stall"), tmp_path / "f", sha256=server.sha256, limits=limits)
    assert caught.value.code == "input_timeout"


async def test_a_redirect_to_an_allowed_host_is_followed(
    server: InputServer, tmp_path: Path
) -> None:
    url = server.url("/to?url=" + server.url("/file"))
    assert await _fetch(url, tmp_path / "f", sha256=server.sha256) == DATA
    assert server.hits["/to"] == server.hits["/file"] == 1


async def test_a_redirect_to_a_host_the_policy_does_not_allow_is_refused(
    server: InputServer, tmp_path: Path
) -> None:
    elsewhere = server.url("/file").replace("127.0.0.1", "localhost")
    with pytest.raises(InputError) as caught:
        await _fetch(server.url("/to?url=" + elsewhere), tmp_path / "f", sha256=server.sha256)
    assert caught.value.code == "input_redirect_refused"
    assert server.hits["/file"] == 0


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x"])
async def test_a_redirect_to_another_scheme_is_refused(
    server: InputServer, tmp_path: Path, target: str
) -> None:
    with pytest.raises(InputError) as caught:
        await _fetch(server.url("/to?url=" + target), tmp_path / "f", sha256=server.sha256)
    assert caught.value.code == "input_scheme_refused"


async def test_endless_redirects_are_refused(server: InputServer, tmp_path: Path) -> None:
    url = server.url("/to?url=/to%3Furl%3D/to%253Furl%253D/to%25253Furl%25253D/file")
    with pytest.raises(InputError) as caught:
        await _fetch(url, tmp_path / "f", sha256=server.sha256)
    assert caught.value.code == "input_redirect_refused"


async def test_a_closed_port_is_unreachable(tmp_path: Path) -> None:
    with serve_input(DATA) as gone:
        url = gone.url("/file")
    with pytest.raises(InputError) as caught:
        await _fetch(url, tmp_path / "f", sha256="0" * 64)
    assert caught.value.code == "input_unreachable"


async def test_a_url_of_another_scheme_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        await _fetch("ftp://127.0.0.1/x", tmp_path / "f", sha256="0" * 64)
    assert caught.value.code == "input_scheme_refused"
