"""The HTTP API and dashboard: a request in, a status, content type and body out.

Sans-I/O like the rest: :mod:`coordinator.server` hands each plain HTTP request on the
websocket's port to :func:`route` (GET only: that port's parser refuses request bodies),
and :mod:`coordinator.admin`'s loopback listener hands its requests to :func:`admin_route`
(GET as :func:`route`, plus the authenticated POSTs).

Read (both listeners, no token):

- ``GET /api/nodes?offset=N&limit=M`` -> ``{"nodes": [node summary, ...], "total",
  "offset"}``: most recently seen first, 100 a page by default, at most 1000
- ``GET /api/nodes/{id}`` -> node summary + ``profile`` (the latest verified profile or
  null) + ``unverified_profile`` (null, or the newest profile when its nonce did not hold:
  its ``seq``, ``received``, ``reason``, ``detail`` and ``profile``; never verified hardware)

A summary's ``profile_verified`` is true only when the node's newest profile verified;
``gpu_count`` and ``gpus`` (their names) count the GPUs of its latest verified profile only;
``latest_telemetry`` holds the newest batch's last sample only.
- ``GET /api/nodes/{id}/telemetry?since_seq=N&limit=M`` -> ``{"node_id", "items": [...]}``:
  at most M batches and 4 MiB of their JSON (at least one batch): a page ends where it
  would pass either; the next starts past its last ``seq``
- ``GET /api/jobs?node_id=ID&limit=N`` -> ``{"jobs": [job summary, ...]}``, newest first
- ``GET /api/jobs/{id}`` -> the job: state, spec, offer, cancel, logs, result (the
  verified receipt, its digest, ``chain_ok`` and ``problems``); 404 ``unknown_job``
- ``GET /api/deployments`` and ``GET /api/deployments/{name}``: :mod:`coordinator.deployments_api`
- ``GET /api/requests?limit=N`` -> ``{"requests": [record, ...]}``: the gateway's request
  records, newest first (:mod:`coordinator.gateway.keys_api`)
- ``GET /`` -> the dashboard page

Write (the admin listener only, from loopback, with ``Authorization: Bearer <token>``):

- ``POST /api/jobs`` ``{"node_id", "spec", "job_id"?, "ttl_s"?}`` -> 201 ``{"job_id", "url"}``
- ``POST /api/jobs/{id}/cancel`` ``{"reason"?}`` (or no body) -> 202 ``{"job_id"}``
- ``POST /api/keys`` ``{"name", "rate_per_min"?}`` -> 201 the key with its text (shown
  once); ``GET /api/keys`` (token too) -> ``{"keys": [...]}``; ``POST
  /api/keys/{id}/revoke`` -> the key, revoked
- ``POST /api/nodes/{id}/prefetch`` ``{"image"}`` -> 202 ``{"node_id", "image"}`` (the image
  pinned): the node pulls it now, before a job needs it
- ``POST /api/deployments`` ``{"name", "spec", "replicas"}`` -> 201 the deployment;
  ``POST /api/deployments/{name}/scale`` ``{"replicas"}`` -> 200 the deployment;
  ``DELETE /api/deployments/{name}`` -> 202 ``{"name", "cancelled"}``: every replica cancelled

Errors are ``{"error": {"code", "detail"}}``: 400 ``bad_request``, ``bad_spec``,
``bad_job_id``, ``bad_ttl``, ``bad_reason``, ``spec_too_large``, ``bad_name``,
``bad_replicas``, ``not_a_service``; 401 ``unauthorized``; 403 ``forbidden``; 404
``not_found``, ``unknown_node``, ``unknown_job``, ``unknown_deployment``; 405; 409
``job_exists``, ``job_final``, ``deployment_exists``, ``too_many_deployments``.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Collection
from http import HTTPStatus
from typing import Any, Final

import msgspec

from coordinator import deployments_api, jobs_api
from coordinator.api_util import (
    MAX_LIMIT,
    HttpAnswer,
    HttpRequest,
    coded_error,
    error,
    json_answer,
    split_target,
)
from coordinator.dashboard import PAGE
from coordinator.deployments import Deployments
from coordinator.errors import JobError
from coordinator.gateway import keys_api
from coordinator.job_service import JobService
from coordinator.nodes_store import NodeRow
from coordinator.store import Store

__all__ = ["MAX_TELEMETRY_ANSWER", "HttpAnswer", "HttpRequest", "admin_route", "route"]

#: Node summaries in a page of ``/api/nodes`` unless the query says.
NODES_PAGE: Final = 100
#: The most of a node's telemetry (its JSON) one answer holds: the quota counts it deflated,
#: and a deflated batch may be a thousandth of its text (a sample of a million zeros).
MAX_TELEMETRY_ANSWER: Final = 4 << 20

#: The HTTP status of each JobError code (others: 400).
_JOB_ERROR_STATUS = {
    "unknown_node": HTTPStatus.NOT_FOUND,
    "unknown_job": HTTPStatus.NOT_FOUND,
    "job_exists": HTTPStatus.CONFLICT,
    "job_final": HTTPStatus.CONFLICT,
    "unknown_deployment": HTTPStatus.NOT_FOUND,
    "deployment_exists": HTTPStatus.CONFLICT,
    "too_many_deployments": HTTPStatus.CONFLICT,
    # The image's registry, asked to pin a tag, failed us: not the request's fault.
    "registry_unreachable": HTTPStatus.BAD_GATEWAY,
    "pull_timeout": HTTPStatus.GATEWAY_TIMEOUT,
}


def route(
    method: str, target: str, store: Store, jobs: JobService, connected: Collection[str]
) -> HttpAnswer:
    """The answer to ``method target`` (the request line's path and query)."""
    if method != "GET":
        return error(
            HTTPStatus.METHOD_NOT_ALLOWED,
            "only GET is served here; writes go to the admin API (gpu-coordinator submit)",
        )
    target_ = split_target(target)
    parts = target_.parts
    if not parts:
        return HttpAnswer(HTTPStatus.OK, "text/html; charset=utf-8", PAGE.encode())
    if parts == ["api", "nodes"]:
        return _nodes(store, connected, target_.query)
    if len(parts) in (3, 4) and parts[:2] == ["api", "nodes"]:
        node = store.nodes.get(parts[2])
        if node is None:
            return error(HTTPStatus.NOT_FOUND, f"no node {parts[2]!r}")
        if len(parts) == 3:
            return json_answer(_detail(store, node, connected))
        if parts[3] == "telemetry":
            return _telemetry(store, node.node_id, target_.query)
    if parts == ["api", "requests"]:
        return keys_api.recent_requests(store, target_.query)
    if parts == ["api", "jobs"]:
        return jobs_api.job_list(jobs, target_.query)
    if len(parts) == 3 and parts[:2] == ["api", "jobs"]:
        return jobs_api.job_detail(jobs, parts[2], connected)
    if len(parts) > 4 and parts[:2] == ["api", "jobs"] and parts[3] == "outputs":
        return jobs_api.job_output(jobs, parts[2], "/".join(parts[4:]))
    if parts == ["api", "deployments"]:
        return deployments_api.listing(store, connected)
    if len(parts) == 3 and parts[:2] == ["api", "deployments"]:
        return deployments_api.detail(store, parts[2], connected)
    return error(HTTPStatus.NOT_FOUND, f"no such path {target_.path!r}")


async def admin_route(
    request: HttpRequest,
    *,
    token: str,
    store: Store,
    connected: Collection[str],
    jobs: JobService,
    deployments: Deployments | None = None,
) -> HttpAnswer:
    """The admin listener's answer: GET as :func:`route`; POST and DELETE, and the API
    keys, only from loopback with ``token``."""
    keys = split_target(request.target).parts[:2] == ["api", "keys"]
    if request.method not in ("POST", "DELETE") and not keys:
        return route(request.method, request.target, store, jobs, connected)
    if not _loopback(request.peer):
        return coded_error(HTTPStatus.FORBIDDEN, "forbidden", "writes only from this machine")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        answer = coded_error(
            HTTPStatus.UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer <token of the coordinator's admin.json>",
        )
        return msgspec.structs.replace(answer, headers=(("WWW-Authenticate", "Bearer"),))
    target = split_target(request.target)
    parts = target.parts
    if parts == ["api", "keys"]:
        if request.method == "GET":
            return keys_api.listing(store)
        if request.method == "POST":
            return keys_api.create(store, request.body)
    revoking = len(parts) == 4 and parts[:2] == ["api", "keys"] and parts[3] == "revoke"
    if revoking and request.method == "POST":
        return keys_api.revoke(store, parts[2])
    if request.method not in ("POST", "DELETE"):
        return error(HTTPStatus.METHOD_NOT_ALLOWED, f"not {request.method} {target.path!r}")
    try:
        if deployments is not None and parts[:2] == ["api", "deployments"]:
            if request.method == "POST" and len(parts) == 2:
                return await deployments_api.create(deployments, store, request.body)
            if request.method == "POST" and len(parts) == 4 and parts[3] == "scale":
                return await deployments_api.scale(deployments, store, parts[2], request.body)
            if request.method == "DELETE" and len(parts) == 3:
                return await deployments_api.delete(deployments, parts[2])
        if request.method != "POST":
            return error(HTTPStatus.METHOD_NOT_ALLOWED, "DELETE is for a deployment only")
        if parts == ["api", "jobs"]:
            return await jobs_api.submit(jobs, request.body)
        if len(parts) == 4 and parts[:2] == ["api", "jobs"] and parts[3] == "cancel":
            return await jobs_api.cancel(jobs, parts[2], request.body)
        if len(parts) == 4 and parts[:2] == ["api", "nodes"] and parts[3] == "prefetch":
            return await jobs_api.prefetch(jobs, parts[2], request.body)
    except JobError as exc:
        status = _JOB_ERROR_STATUS.get(exc.code, HTTPStatus.BAD_REQUEST)
        return coded_error(status, exc.code, exc.detail)
    return error(HTTPStatus.NOT_FOUND, f"no such path {target.path!r}")


def _loopback(peer: str) -> bool:
    try:
        return ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False


def _nodes(store: Store, connected: Collection[str], query: dict[str, list[str]]) -> HttpAnswer:
    """A page of node summaries: built on the loop, so a page, not 10,000 of them."""
    try:
        offset = int(query.get("offset", ["0"])[0])
        limit = min(int(query.get("limit", [str(NODES_PAGE)])[0]), MAX_LIMIT)
    except ValueError:
        return error(HTTPStatus.BAD_REQUEST, "offset and limit are integers")
    if not 0 <= offset < 1 << 63 or limit < 1:
        return error(HTTPStatus.BAD_REQUEST, "offset in 0..2^63-1 and limit >= 1")
    page = store.nodes.all(offset=offset, limit=limit)
    nodes = [_summary(store, n, connected) for n in page]
    return json_answer({"nodes": nodes, "total": store.nodes.count(), "offset": offset})


def _summary(store: Store, node: NodeRow, connected: Collection[str]) -> dict[str, Any]:
    profile = store.nodes.profile(node.node_id)
    gpus = profile.profile.get("gpus", []) if profile is not None else []
    gpus = gpus if isinstance(gpus, list) else []
    newest = store.nodes.latest_profile(node.node_id)
    latest = store.nodes.latest_sample(node.node_id)
    return {
        "node_id": node.node_id,
        "public_key": node.public_key,
        "connected": node.node_id in connected,
        "first_seen": node.first_seen,
        "last_seen": node.last_seen,
        "last_agent_seq": node.last_agent_seq,
        "profile_verified": newest is not None and newest.verified,
        "gpu_count": len(gpus),
        "gpus": [_gpu_name(g) for g in gpus],
        # The newest batch's last sample only: a batch is ~56 KB of JSON.
        "latest_telemetry": None
        if latest is None
        else {
            "seq": latest.seq,
            "samples": [] if latest.sample is None else [latest.sample],
            "dropped": latest.dropped,
        },
    }


def _gpu_name(gpu: Any) -> str:
    """A GPU of a verified profile as the dashboard names it."""
    if not isinstance(gpu, dict):
        return "?"
    return str(gpu.get("name") or gpu.get("id") or "?")


def _detail(store: Store, node: NodeRow, connected: Collection[str]) -> dict[str, Any]:
    profile = store.nodes.profile(node.node_id)
    summary = _summary(store, node, connected)
    summary["profile"] = (
        None
        if profile is None
        else {"seq": profile.seq, "verified_at": profile.verified_at, "profile": profile.profile}
    )
    newest = store.nodes.latest_profile(node.node_id)
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
        limit = min(int(query.get("limit", [str(MAX_LIMIT)])[0]), MAX_LIMIT)
    except ValueError:
        return error(HTTPStatus.BAD_REQUEST, "since_seq and limit are integers")
    if not 0 <= since < 1 << 63 or limit < 1:  # a seq is what SQLite's integers hold
        return error(HTTPStatus.BAD_REQUEST, "since_seq in 0..2^63-1 and limit >= 1")
    messages = store.nodes.messages(
        node_id, "telemetry", since_seq=since, limit=limit, max_bytes=MAX_TELEMETRY_ANSWER
    )
    items = [_item(m.seq, m.body) | {"received": m.received} for m in messages]
    return json_answer({"node_id": node_id, "items": items})


def _item(seq: int, body: Any) -> dict[str, Any]:
    return {"seq": seq, "samples": body.get("samples", []), "dropped": body.get("dropped", 0)}
