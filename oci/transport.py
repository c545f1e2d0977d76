"""One bounded HTTPS exchange, over httpx.

Every body is capped (a hostile registry can send an endless one), every socket wait is
bounded by ``stall`` and the whole exchange by ``deadline``, so a registry that drips one
byte at a time is cut off too. Failures come out as OciError codes, never as httpx's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from oci.errors import ImageError, RegistryError

__all__ = ["Response", "exchange"]


@dataclass(frozen=True)
class Response:
    """A status, its headers and the whole (capped) body."""

    status: int
    headers: httpx.Headers
    body: bytes


def exchange(
    http: httpx.Client,
    url: str,
    *,
    headers: dict[str, str],
    stall: float,
    deadline: float,
    max_body: int,
) -> Response:
    """GET an https ``url``; read at most ``max_body`` bytes of the answer.

    ``deadline`` is a ``time.monotonic()`` instant. A 2xx body over the cap is
    ``manifest_too_large``; any other body is cut at the cap (only its status matters).
    The body is read raw: digests are over the bytes sent, and no decompression bomb
    can go off (``Accept-Encoding: identity`` asks for none).
    """
    if urlsplit(url).scheme != "https":
        raise RegistryError("registry_unreachable", f"{_safe(url)}: only https URLs are used")
    try:
        timeout = httpx.Timeout(_left(stall, deadline))
        request = {**headers, "Accept-Encoding": "identity"}
        with http.stream("GET", url, headers=request, timeout=timeout) as response:
            ok = response.is_success
            length = response.headers.get("Content-Length", "")
            if ok and length.isdigit() and int(length) > max_body:
                raise ImageError("manifest_too_large", f"{_safe(url)}: {length} bytes announced")
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_raw():
                chunks.append(chunk)
                size += len(chunk)
                if size > max_body:
                    if ok:
                        raise ImageError("manifest_too_large", f"{_safe(url)}: over {max_body}")
                    break
                _left(stall, deadline)
            return Response(response.status_code, response.headers, b"".join(chunks))
    except (TimeoutError, httpx.TimeoutException) as error:
        raise RegistryError("pull_timeout", f"{_safe(url)}: the registry stalled") from error
    except (httpx.TransportError, httpx.InvalidURL, httpx.StreamError) as error:
        raise RegistryError("registry_unreachable", f"{_safe(url)}: {error!r}") from error


def _left(stall: float, deadline: float) -> float:
    """How long the next wait may take: the stall bound, or what is left of the deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return min(stall, left)


def _safe(url: str) -> str:
    """The URL without user info or query, fit for an error's detail."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
