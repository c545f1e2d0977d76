"""PUT one spooled output file to its target, over HTTP(S), with retries.

The same code serves a presigned S3 URL and the coordinator's artifact store: a PUT with a
``Content-Length`` and the target's headers, the body streamed from the spool file and
hashed on the way, so that what left is what the receipt names (``output_changed`` if the
spool file no longer is). A 2xx is the store's acknowledgement; 408, 429, 5xx and
transport errors (a store down, a coordinator restarting: connection refused) are retried
with exponential backoff and full jitter (:func:`backoff`) until the deadline the caller
gives (when the target's credential has expired: nothing could take the bytes after it);
any other answer is final (``upload_refused``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Final, NamedTuple
from urllib.parse import urlsplit

import httpx

from agent.errors import UploadError
from agent.protocol.uploads import UploadTarget

__all__ = ["RetryPolicy", "backoff", "put_file", "retryable"]

_log = logging.getLogger(__name__)
_CHUNK: Final = 1 << 20


class RetryPolicy(NamedTuple):
    """How often and how patiently an upload is retried."""

    attempts: int = 0
    """At most this many attempts (0: no cap, until the deadline)."""
    base_s: float = 0.5
    max_s: float = 30.0
    timeout_s: float = 60.0
    """Connect, and each read or write, may take this long before the attempt fails."""
    give_up_s: float = 86400.0
    """The deadline: this long after the job ended. The reference coordinator's upload
    tokens last a day past the job's latest end; a store down for longer than that has
    lost the job's outputs anyway (a presigned URL that expired sooner answers 403)."""


_DEFAULT: Final = RetryPolicy()


def backoff(attempt: int, policy: RetryPolicy, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): full jitter over an exponential
    ceiling, so that nodes retrying against one store do not come back in step."""
    ceiling = min(policy.max_s, policy.base_s * (2 ** (attempt - 1)))
    return float(ceiling * rand())


def retryable(status: int) -> bool:
    """Whether a store's answer may turn out otherwise on a retry."""
    return status in (408, 429) or status >= 500


async def put_file(
    client: httpx.AsyncClient,
    path: Path,
    target: UploadTarget,
    *,
    size: int,
    sha256: str,
    policy: RetryPolicy = _DEFAULT,
    deadline: float | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """PUT ``path`` (``size`` bytes hashing to ``sha256``) to ``target`` until a 2xx;
    retried until ``deadline`` (on ``clock``; None: no deadline) or ``policy.attempts``.

    Raises:
        UploadError: ``upload_refused`` (a final 4xx), ``upload_failed`` (retries spent,
            or the deadline reached), ``output_changed`` (the file is not the one hashed).
    """
    where = _where(target.url)
    attempt = 0
    while True:
        attempt += 1
        try:
            status = await _put_once(client, path, target, size, sha256, policy)
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"[:300]
        else:
            if 200 <= status < 300:
                return
            if not retryable(status):
                raise UploadError("upload_refused", f"{where} answered {status}")
            last = f"{where} answered {status}"
        if attempt <= 8 or attempt % 100 == 0:  # a store down for a day: not 3000 lines
            _log.info("upload to %s, attempt %d: %s", where, attempt, last)
        wait = backoff(attempt, policy)
        if attempt == policy.attempts or (deadline is not None and clock() + wait >= deadline):
            raise UploadError("upload_failed", f"{attempt} attempts; the last: {last}")
        await sleep(wait)


async def _put_once(  # noqa: PLR0917 (private, called once)
    client: httpx.AsyncClient,
    path: Path,
    target: UploadTarget,
    size: int,
    sha256: str,
    policy: RetryPolicy,
) -> int:
    digest = hashlib.sha256()
    headers = {**target.headers, "Content-Length": str(size)}
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if os.fstat(fd).st_size != size:
            raise UploadError("output_changed", f"{path.name} is no longer {size} bytes")

        def read(offset: int) -> bytes:
            # Read and hash in a worker thread (hashlib lets go of the GIL on large
            # buffers): the next chunk is ready while the current one is being sent.
            chunk = os.pread(fd, min(_CHUNK, size - offset), offset)
            digest.update(chunk)
            return chunk

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            ahead = _read_ahead(read, 0) if size else None
            try:
                while ahead is not None:
                    chunk = await ahead
                    if not chunk:
                        raise UploadError("output_changed", f"{path.name} shrank under the upload")
                    sent += len(chunk)
                    ahead = _read_ahead(read, sent) if sent < size else None
                    yield chunk
            finally:
                if ahead is not None:  # stopped early: no read may outlive the descriptor
                    with contextlib.suppress(OSError):
                        await ahead

        response = await client.put(
            target.url,
            content=body(),
            headers=headers,
            timeout=httpx.Timeout(policy.timeout_s),
        )
        await response.aclose()
    finally:
        os.close(fd)
    if digest.hexdigest() != sha256:
        raise UploadError("output_changed", f"{path.name} no longer hashes to its receipt's")
    return response.status_code


def _read_ahead(read: Callable[[int], bytes], offset: int) -> asyncio.Future[bytes]:
    return asyncio.ensure_future(asyncio.to_thread(read, offset))


def _where(url: str) -> str:
    """The URL without its query: a presigned URL's query is a credential, never logged."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
