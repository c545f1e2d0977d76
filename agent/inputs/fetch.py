"""Fetch one input by URL: streamed, capped at its announced size, its digest checked.

The decisions are pure functions (:func:`redirect_target`, :func:`status_error`); the
I/O is :func:`fetch`, which writes into a file the caller owns (the cache's temp file) and
returns only once every byte was received and the digest matched. What goes wrong is an
:class:`~agent.errors.InputError` with a stable code.

http is allowed as well as https: the digest in the signed spec, not the transport, is
what makes the bytes trusted; a redirect never goes from https to http all the same (it
would hand the request's path to anyone on the path).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import urllib.parse
from typing import Final

import httpcore
import httpx
import msgspec

from agent.errors import InputError
from sandbox.urls import host_allowed, url_problem

__all__ = ["FetchLimits", "fetch", "redirect_target", "status_error"]

_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
# What is handed to the writing thread at once: large enough that the hand-off costs little.
_BATCH_BYTES: Final = 1 << 20
# httpcore reads a body 64 KiB at a time, and each read costs about as much Python as
# hashing 64 KiB: reading up to 1 MiB at once takes the agent's CPU per GiB fetched from
# about 3.1 s to 2.4 s (bench/input_fetch.py). httpcore has it as a class constant, not an
# option: it is raised here for the whole process (other httpx clients only gain by it).
if getattr(httpcore.AsyncHTTP11Connection, "READ_NUM_BYTES", 0) < _BATCH_BYTES:
    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = _BATCH_BYTES


class FetchLimits(msgspec.Struct, frozen=True, kw_only=True):
    """How long a fetch may take and how far it may be sent.

    Attributes:
        stall_s: the longest wait for the next byte (or for a connection).
        deadline_s: the longest a whole fetch may take, redirects included.
        max_redirects: redirects followed at most.
    """

    stall_s: float = 30.0
    deadline_s: float = 3600.0
    max_redirects: int = 5


def redirect_target(current: str, location: str, allowed_hosts: list[str]) -> str:
    """Where a redirect from ``current`` to ``location`` goes, if it may be followed."""
    target = urllib.parse.urljoin(current, location)
    scheme = urllib.parse.urlsplit(target).scheme
    if scheme not in ("https", "http"):
        raise InputError("input_scheme_refused", f"redirect to a {scheme!r} URL")
    if urllib.parse.urlsplit(current).scheme == "https" and scheme == "http":
        raise InputError("input_redirect_refused", f"redirect from https to http ({target})")
    if problem := url_problem(target):
        raise InputError("input_redirect_refused", f"redirect to {target!r}: {problem}")
    if not host_allowed(target, allowed_hosts):
        raise InputError("input_redirect_refused", f"redirect to a host not allowed: {target}")
    return target


def status_error(status: int, url: str) -> InputError | None:
    """The error an answer's status means, or None for 200 (the whole file)."""
    if status == 200:
        return None
    if status in (404, 410):
        return InputError("input_not_found", f"{url} answered {status}")
    return InputError("input_http_error", f"{url} answered {status}")


async def fetch(
    url: str,
    fd: int,
    *,
    sha256: str,
    size_bytes: int,
    allowed_hosts: list[str],
    limits: FetchLimits,
) -> None:
    """Stream ``url`` into the open file ``fd``; return once ``size_bytes`` bytes hashing
    to ``sha256`` were written, else raise InputError (what was written is then garbage)."""
    if urllib.parse.urlsplit(url).scheme not in ("https", "http"):
        raise InputError("input_scheme_refused", f"{url}: only https and http")
    timeout = httpx.Timeout(limits.stall_s)
    # No proxy or netrc from the environment: what is fetched from where is the policy's.
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        try:
            async with asyncio.timeout(limits.deadline_s):
                await _follow(
                    client,
                    url,
                    fd,
                    sha256=sha256,
                    size_bytes=size_bytes,
                    allowed_hosts=allowed_hosts,
                    limits=limits,
                )
        except TimeoutError:
            raise InputError("input_timeout", f"{url}: over {limits.deadline_s:g}s") from None
        except httpx.TimeoutException as exc:
            what = f"no byte for {limits.stall_s:g}s"
            raise InputError("input_timeout", f"{url}: {what} ({type(exc).__name__})") from None
        except httpx.TransportError as exc:  # refused, reset, cut short, bad TLS, ...
            raise InputError("input_unreachable", f"{url}: {exc or type(exc).__name__}") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # an answer that is not HTTP
            raise InputError("input_http_error", f"{url}: {exc or type(exc).__name__}") from None


async def _follow(
    client: httpx.AsyncClient,
    url: str,
    fd: int,
    *,
    sha256: str,
    size_bytes: int,
    allowed_hosts: list[str],
    limits: FetchLimits,
) -> None:
    for _ in range(limits.max_redirects + 1):
        # identity: the digest is of the bytes as sent, and nothing is inflated here.
        request = client.build_request("GET", url, headers={"Accept-Encoding": "identity"})
        response = await client.send(request, stream=True)
        try:
            if response.status_code in _REDIRECTS and "location" in response.headers:
                url = redirect_target(url, response.headers["location"], allowed_hosts)
                continue
            if (error := status_error(response.status_code, url)) is not None:
                raise error
            await _receive(response, fd, sha256, size_bytes)
            return
        finally:
            await response.aclose()
    raise InputError("input_redirect_refused", f"more than {limits.max_redirects} redirects")


async def _receive(response: httpx.Response, fd: int, sha256: str, size_bytes: int) -> None:
    url = str(response.url)
    announced = response.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > size_bytes:
        raise InputError("input_too_large", f"{url} announces {announced} of {size_bytes} bytes")
    sink = _Sink(fd)
    try:
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
            if received > size_bytes:
                raise InputError("input_too_large", f"{url} sent more than {size_bytes} bytes")
            await sink.add(chunk)
        await sink.finish()
    finally:
        sink.close()
    if received != size_bytes:
        detail = f"{url} sent {received} of {size_bytes} bytes"
        raise InputError("input_digest_mismatch", detail)
    if sink.digest.hexdigest() != sha256:
        detail = f"{url}: sha256 {sink.digest.hexdigest()}, not {sha256}"
        raise InputError("input_digest_mismatch", detail)


class _Sink:
    """Hashes and writes what was received in a worker thread, one batch at a time, while
    the event loop receives the next: both release the GIL, so they overlap."""

    def __init__(self, fd: int) -> None:
        # Its own descriptor, closed only once the last write is done: a fetch cancelled
        # mid-write must not leave a thread writing to a number the caller closed and
        # something else may have opened since.
        self._fd = os.dup(fd)
        self.digest = hashlib.sha256()
        self._pending: asyncio.Future[None] | None = None
        self._batch: list[bytes] = []
        self._batched = 0

    async def add(self, chunk: bytes) -> None:
        """Take one chunk; hand a full batch to the worker once it is done with the last."""
        self._batch.append(chunk)
        self._batched += len(chunk)
        if self._batched >= _BATCH_BYTES:
            await self._flush()

    async def finish(self) -> None:
        """Return once everything taken is hashed and written."""
        await self._flush()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending

    def close(self) -> None:
        """Close the descriptor now, or once the write under way is done."""
        pending, fd = self._pending, self._fd
        if pending is None or pending.done():
            os.close(fd)
            if pending is not None and not pending.cancelled():
                pending.exception()  # retrieved: the fetch has already failed
            return

        def closed(done: asyncio.Future[None]) -> None:
            os.close(fd)
            if not done.cancelled():
                done.exception()

        pending.add_done_callback(closed)

    async def _flush(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending
        if self._batch:
            batch, self._batch, self._batched = self._batch, [], 0
            loop = asyncio.get_running_loop()
            self._pending = loop.run_in_executor(None, self._consume, batch)

    def _consume(self, batch: list[bytes]) -> None:
        for chunk in batch:
            self.digest.update(chunk)
            _write_all(self._fd, chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InputError("disk_full", f"writing the input: {exc.strerror}") from None
        raise
