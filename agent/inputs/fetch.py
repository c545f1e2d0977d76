"""Fetch one input by URL: streamed, capped at its announced size, its digest checked.

The decisions are pure functions (:func:`redirect_target`, :func:`status_error`); the
I/O is :func:`fetch`, which writes into a file the caller owns (the cache's temp file) and
returns only once every byte was received and the digest matched. What goes wrong is an
:class:`~agent.errors.InputError` with a stable code. The HTTP is :mod:`agent.inputs.http1`
(a GET of its own on h11: the body is received in place into preallocated buffers, then
hashed and written by two worker threads; with httpx and one thread that hashed and
wrote, the agent had about half of curl's throughput on loopback and twice its CPU per
GiB, bench/input_fetch.py).

http is allowed as well as https: the digest in the signed spec, not the transport, is
what makes the bytes trusted; a redirect never goes from https to http all the same (it
would hand the request's path to anyone on the path). https trusts certifi's CAs, as
httpx does.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import urllib.parse
from collections.abc import Callable
from typing import Final

import certifi
import msgspec

from agent.errors import InputError
from agent.inputs.http1 import get
from sandbox.urls import host_allowed, url_problem

__all__ = ["FetchLimits", "fetch", "redirect_target", "status_error"]

_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})


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
    progress: Callable[[int], None] | None = None,
    context: ssl.SSLContext | None = None,
) -> None:
    """Stream ``url`` into the open file ``fd``; return once ``size_bytes`` bytes hashing
    to ``sha256`` were written, else raise InputError (what was written is then garbage).

    ``progress`` is called with the bytes received so far as they go to the disk (a few
    MiB at a time); ``context`` checks https servers' certificates (default: certifi's
    CAs)."""
    if urllib.parse.urlsplit(url).scheme not in ("https", "http"):
        raise InputError("input_scheme_refused", f"{url}: only https and http")
    context = context or _default_context()
    try:
        async with asyncio.timeout(limits.deadline_s):
            for _ in range(limits.max_redirects + 1):
                async with get(url, stall_s=limits.stall_s, context=context) as answer:
                    if answer.status in _REDIRECTS and "location" in answer.headers:
                        url = redirect_target(url, answer.headers["location"], allowed_hosts)
                        continue
                    if (error := status_error(answer.status, url)) is not None:
                        raise error
                    announced = answer.headers.get("content-length", "")
                    if announced.isdigit() and int(announced) > size_bytes:
                        detail = f"{url} announces {announced} of {size_bytes} bytes"
                        raise InputError("input_too_large", detail)
                    digest = await answer.receive(
                        fd, cap=size_bytes, stall_s=limits.stall_s, progress=progress
                    )
                    _check(url, answer.received, digest, size_bytes=size_bytes, sha256=sha256)
                    return
    except TimeoutError:
        raise InputError("input_timeout", f"{url}: over {limits.deadline_s:g}s") from None
    raise InputError("input_redirect_refused", f"more than {limits.max_redirects} redirects")


def _check(url: str, received: int, digest: str, *, size_bytes: int, sha256: str) -> None:
    """The body is the input: its size and its digest are the ones announced."""
    if received != size_bytes:
        detail = f"{url} sent {received} of {size_bytes} bytes"
        raise InputError("input_digest_mismatch", detail)
    if digest != sha256:
        raise InputError("input_digest_mismatch", f"{url}: sha256 {digest}, not {sha256}")


@functools.cache
def _default_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certifi.where())
