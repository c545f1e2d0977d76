"""The read API and dashboard: a GET path in, a status, content type and body out.

Sans-I/O like the rest: :mod:`coordinator.server` hands each plain HTTP request on the
websocket's port to :func:`route`.

- ``GET /api/nodes`` -> ``{"nodes": [node summary, ...]}``
- ``GET /api/nodes/{id}`` -> node summary + ``profile`` (the latest verified profile or
  null) + ``unverified_profile`` (null, or the newest profile when its nonce did not hold:
  its ``seq``, ``received``, ``reason``, ``detail`` and ``profile``; never verified hardware)

A summary's ``profile_verified`` is true only when the node's newest profile verified;
``gpu_count`` counts the GPUs of its latest verified profile only.
- ``GET /api/nodes/{id}/telemetry?since_seq=N&limit=M`` -> ``{"node_id", "items": [...]}``
- ``GET /`` -> the dashboard page
"""

from __future__ import annotations

from collections.abc import Collection
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec

from coordinator.dashboard import PAGE
from coordinator.store import NodeRow, Store

__all__ = ["HttpAnswer", "route"]

_JSON = "application/json"
_MAX_LIMIT = 1000


class HttpAnswer(msgspec.Struct, frozen=True):
    """What to answer a request with."""

    status: HTTPStatus
    content_type: str
    body: bytes


def route(method: str, target: str, store: Store, connected: Collection[str]) -> HttpAnswer:
    """The answer to ``method target`` (the request line's path and query)."""
    if method != "GET":
        return _error(HTTPStatus.METHOD_NOT_ALLOWED, "only GET is served")
    url = urlsplit(target)
    parts = [unquote(p) for p in url.path.split("/") if p]
    if not parts:
        return HttpAnswer(HTTPStatus.OK, "text/html; charset=utf-8", PAGE.encode())
    if parts == ["api", "nodes"]:
        nodes = [_summary(store, n, connected) for n in store.nodes()]
        return _json({"nodes": nodes})
    if len(parts) in (3, 4) and parts[:2] == ["api", "nodes"]:
        node = store.node(parts[2])
        if node is None:
            return _error(HTTPStatus.NOT_FOUND, f"no node {parts[2]!r}")
        if len(parts) == 3:
            return _json(_detail(store, node, connected))
        if parts[3] == "telemetry":
            return _telemetry(store, node.node_id, parse_qs(url.query))
    return _error(HTTPStatus.NOT_FOUND, f"no such path {url.path!r}")


def _summary(store: Store, node: NodeRow, connected: Collection[str]) -> dict[str, Any]:
    profile = store.profile(node.node_id)
    gpus = profile.profile.get("gpus", []) if profile is not None else []
    newest = store.latest_profile(node.node_id)
    latest = store.latest(node.node_id, "telemetry")
    return {
        "node_id": node.node_id,
        "public_key": node.public_key,
        "connected": node.node_id in connected,
        "first_seen": node.first_seen,
        "last_seen": node.last_seen,
        "last_agent_seq": node.last_agent_seq,
        "profile_verified": newest is not None and newest.verified,
        "gpu_count": len(gpus) if isinstance(gpus, list) else 0,
        "latest_telemetry": None if latest is None else _item(latest.seq, latest.body),
    }


def _detail(store: Store, node: NodeRow, connected: Collection[str]) -> dict[str, Any]:
    profile = store.profile(node.node_id)
    summary = _summary(store, node, connected)
    summary["profile"] = (
        None
        if profile is None
        else {"seq": profile.seq, "verified_at": profile.verified_at, "profile": profile.profile}
    )
    newest = store.latest_profile(node.node_id)
    summary["unverified_profile"] = (
        None
        if newest is None or newest.unverified is None
        else {
            "seq": newest.seq,
            "received": newest.received,
            "reason": newest.unverified.reason,
            "detail": newest.unverified.detail,
            "profile": newest.profile,
        }
    )
    return summary


def _telemetry(store: Store, node_id: str, query: dict[str, list[str]]) -> HttpAnswer:
    try:
        since = int(query.get("since_seq", ["0"])[0])
        limit = min(int(query.get("limit", [str(_MAX_LIMIT)])[0]), _MAX_LIMIT)
    except ValueError:
        return _error(HTTPStatus.BAD_REQUEST, "since_seq and limit are integers")
    if since < 0 or limit < 1:
        return _error(HTTPStatus.BAD_REQUEST, "since_seq >= 0 and limit >= 1")
    messages = store.messages(node_id, "telemetry", since_seq=since, limit=limit)
    items = [_item(m.seq, m.body) | {"received": m.received} for m in messages]
    return _json({"node_id": node_id, "items": items})


def _item(seq: int, body: Any) -> dict[str, Any]:
    return {"seq": seq, "samples": body.get("samples", []), "dropped": body.get("dropped", 0)}


def _json(value: object, status: HTTPStatus = HTTPStatus.OK) -> HttpAnswer:
    return HttpAnswer(status, _JSON, msgspec.json.encode(value))


def _error(status: HTTPStatus, detail: str) -> HttpAnswer:
    code = status.phrase.lower().replace(" ", "_")
    return _json({"error": {"code": code, "detail": detail}}, status)
