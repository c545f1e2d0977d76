"""One bounded HTTPS exchange over the standard library's http.client.

Every body is capped (a hostile registry can send an endless one), every socket wait is
bounded by ``stall`` and the whole exchange by ``deadline``, so a registry that drips one
byte at a time is cut off too. Failures come out as OciError codes, never as OSError.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from dataclasses import dataclass
from email.message import Message
from urllib.parse import urlsplit

from oci.errors import ImageError, RegistryError

__all__ = ["Response", "exchange"]

_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Response:
    """A status, its headers and the whole (capped) body."""

    status: int
    headers: Message
    body: bytes


def exchange(
    url: str,
    *,
    headers: dict[str, str],
    context: ssl.SSLContext,
    stall: float,
    deadline: float,
    max_body: int,
) -> Response:
    """GET an https ``url``; read at most ``max_body`` bytes of the answer.

    ``deadline`` is a ``time.monotonic()`` instant. A 2xx body over the cap is
    ``manifest_too_large``; any other body is cut at the cap (only its status matters).
    """
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as error:
        raise RegistryError("registry_unreachable", f"{_safe(url)}: bad port") from error
    if parts.scheme != "https" or not parts.hostname:
        raise RegistryError("registry_unreachable", f"{_safe(url)}: only https URLs are used")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = http.client.HTTPSConnection(
        parts.hostname, port, context=context, timeout=_wait(stall, deadline)
    )
    response = None
    try:
        connection.request("GET", target, headers=headers)
        # Kept: a response that will close takes the socket over, and connection.sock is None.
        sock = connection.sock
        response = connection.getresponse()
        length = response.getheader("Content-Length")
        ok = 200 <= response.status < 300
        if ok and length is not None and length.isdigit() and int(length) > max_body:
            raise ImageError("manifest_too_large", f"{_safe(url)}: {length} bytes announced")
        body = _read(sock, response, stall, deadline, max_body)
        if ok and len(body) > max_body:
            raise ImageError("manifest_too_large", f"{_safe(url)}: over {max_body} bytes")
        return Response(status=response.status, headers=response.msg, body=body)
    except TimeoutError as error:
        raise RegistryError("pull_timeout", f"{_safe(url)}: the registry stalled") from error
    except ssl.SSLError as error:
        raise RegistryError("registry_unreachable", f"{_safe(url)}: TLS: {error}") from error
    except (OSError, http.client.HTTPException) as error:
        raise RegistryError("registry_unreachable", f"{_safe(url)}: {error!r}") from error
    except ValueError as error:
        # http.client refuses a header value with CR/LF in it (a hostile token, say).
        raise RegistryError("registry_unreachable", f"{_safe(url)}: {error}") from error
    finally:
        # A response that will close owns the socket: the connection no longer closes it.
        if response is not None:
            response.close()
        connection.close()


def _read(
    sock: socket.socket,
    response: http.client.HTTPResponse,
    stall: float,
    deadline: float,
    max_body: int,
) -> bytes:
    """The body, stopping one byte past the cap so the caller can tell it was over."""
    chunks: list[bytes] = []
    size = 0
    while size <= max_body:
        sock.settimeout(_wait(stall, deadline))
        chunk = response.read1(min(_CHUNK, max_body + 1 - size))
        if not chunk:
            # read1 ends quietly where read() would say IncompleteRead: say it here.
            if response.length:
                raise http.client.IncompleteRead(b"".join(chunks), response.length)
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _wait(stall: float, deadline: float) -> float:
    """How long the next socket wait may take: the stall bound, or what is left."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return min(stall, left)


def _safe(url: str) -> str:
    """The URL without user info or query, fit for an error's detail."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
