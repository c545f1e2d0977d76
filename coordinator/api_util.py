"""What the API's modules share: the request and answer types, JSON answers, coded errors."""

from __future__ import annotations

from http import HTTPStatus
from typing import Final
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec

__all__ = [
    "JSON",
    "MAX_LIMIT",
    "HttpAnswer",
    "HttpRequest",
    "Target",
    "coded_error",
    "error",
    "json_answer",
    "split_target",
]

JSON: Final = "application/json"
#: The most items one list answer holds.
MAX_LIMIT: Final = 1000


class HttpAnswer(msgspec.Struct, frozen=True):
    """What to answer a request with."""

    status: HTTPStatus
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    file: tuple[str, int] | None = None
    """Instead of ``body``: a file's path and size, streamed from disk by the HTTP
    listener (an output may be far larger than an answer should be in memory)."""
    """Headers beyond Content-Type, Content-Length and Cache-Control."""


class HttpRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A request the admin listener read."""

    method: str
    target: str
    headers: dict[str, str]
    """Names in lowercase."""
    body: bytes
    peer: str
    """The client's IP address."""


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """A request target, split."""

    path: str
    parts: list[str]
    """The path's non-empty segments, percent-decoded."""
    query: dict[str, list[str]]


def split_target(target: str) -> Target:
    """The path, its segments and the query of a request line's target."""
    url = urlsplit(target)
    parts = [unquote(p) for p in url.path.split("/") if p]
    return Target(path=url.path, parts=parts, query=parse_qs(url.query))


def json_answer(value: object, status: HTTPStatus = HTTPStatus.OK) -> HttpAnswer:
    """``value`` as a JSON answer."""
    return HttpAnswer(status, JSON, msgspec.json.encode(value))


def coded_error(status: HTTPStatus, code: str, detail: str) -> HttpAnswer:
    """``{"error": {"code", "detail"}}`` with ``status``."""
    return json_answer({"error": {"code": code, "detail": detail}}, status)


def error(status: HTTPStatus, detail: str) -> HttpAnswer:
    """A coded error whose code is the status's phrase (``not_found``, ``bad_request``)."""
    return coded_error(status, status.phrase.lower().replace(" ", "_"), detail)
