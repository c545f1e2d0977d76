"""Where a job's outputs go: the upload targets a coordinator signs into an offer.

An :class:`~agent.protocol.jobs.Offer` may carry ``uploads``, output path -> a
:class:`UploadTarget`: an HTTP(S) URL the node PUTs that file's bytes to, and the headers
the PUT must carry (a presigned S3 URL may sign some). The same shape serves a presigned
URL from an S3-compatible store and the reference coordinator's own artifact store; the
node does not tell them apart. Everything is bounded, and :func:`check_uploads` refuses a
target that names no declared output, a URL of another scheme, credentials in the
authority, or a header the HTTP client must own (``Host``, ``Content-Length``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Final
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from agent.protocol.errors import DecodeError

__all__ = ["MAX_UPLOADS", "MAX_UPLOAD_HEADERS", "MAX_URL_CHARS", "UploadTarget", "check_uploads"]

#: Most upload targets in one offer (a spec names a few outputs).
MAX_UPLOADS: Final = 64
#: Longest target URL: a presigned URL with a session token runs to ~2 KiB.
MAX_URL_CHARS: Final = 4096
#: Most extra headers one PUT carries.
MAX_UPLOAD_HEADERS: Final = 16

_HeaderName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+(?!\n)$")]
# Printable ASCII without CR/LF: a header value cannot smuggle another header.
_HeaderValue = Annotated[str, Meta(max_length=1024, pattern=r"^[\x20-\x7e]*(?!\n)$")]
_Url = Annotated[str, Meta(min_length=8, max_length=MAX_URL_CHARS, pattern=r"^[\x21-\x7e]+(?!\n)$")]
_OutputPath = Annotated[str, Meta(min_length=1, max_length=1024)]

# The client computes these from the body and the URL; an offer must not set them.
_OWNED_HEADERS: Final = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te"}
    | {"trailer", "upgrade", "expect", "proxy-authorization", "proxy-connection", "cookie"}
)
_SCHEMES: Final = frozenset({"http", "https"})
# urlsplit's hostname: a name or IPv4 address, or an IPv6 address without its brackets.
_HOST = re.compile(r"[A-Za-z0-9.-]+|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")


class UploadTarget(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One output's destination: PUT its bytes to ``url`` with ``headers``."""

    url: _Url
    headers: Annotated[dict[_HeaderName, _HeaderValue], Meta(max_length=MAX_UPLOAD_HEADERS)] = {}


#: What :class:`~agent.protocol.jobs.Offer` carries.
Uploads = Annotated[dict[_OutputPath, UploadTarget], Meta(max_length=MAX_UPLOADS)]


def check_uploads(uploads: Mapping[str, UploadTarget], outputs: Sequence[str]) -> None:
    """Refuse targets that do not fit the spec's declared ``outputs``.

    Raises:
        DecodeError: ``bad_upload_target``, saying which target and why.
    """
    declared = set(outputs)
    for path, target in uploads.items():
        if path not in declared:
            raise DecodeError("bad_upload_target", f"{path!r} is not one of the spec's outputs")
        problem = _url_problem(target.url)
        if problem is None:
            problem = next(
                (
                    f"header {h!r} is the client's"
                    for h in target.headers
                    if h.lower() in _OWNED_HEADERS
                ),
                None,
            )
        if problem is not None:
            raise DecodeError("bad_upload_target", f"{path!r}: {problem}")


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in _SCHEMES:
        return f"scheme {parts.scheme!r}, not http or https"
    if "@" in parts.netloc:
        return "credentials in the URL's authority"
    if not _HOST.fullmatch(parts.hostname or "") or port == 0:
        return "no usable host"
    if parts.fragment:
        return "a fragment"
    return None
