"""The API's job routes: the list, one job's view, and the two writes behind the token.

Each reads or writes through :class:`coordinator.job_service.JobService`.
"""

from __future__ import annotations

from collections.abc import Collection
from http import HTTPStatus
from typing import Any, TypeVar

import msgspec

from agent.protocol import crypto
from coordinator.api_util import MAX_LIMIT, HttpAnswer, coded_error, error, json_answer
from coordinator.artifacts import output_problems
from coordinator.errors import JobError
from coordinator.job_service import JobService
from coordinator.jobs_store import JobRow, JobSummary
from coordinator.offers import DEFAULT_TTL_S

__all__ = ["cancel", "job_detail", "job_list", "job_output", "prefetch", "submit"]

_T = TypeVar("_T")


class _Submit(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    node_id: str
    spec: Any
    job_id: str | None = None
    ttl_s: float = DEFAULT_TTL_S
    uploads: dict[str, Any] = {}
    """Output path -> ``{"url", "headers"}``: the submitter's own targets (presigned PUT
    URLs); the other outputs go to the coordinator's artifact store."""
    registry_logins: dict[str, Any] = {}
    """Registry host -> ``{"username", "password"}``: a short-lived login to the image's
    registry, for pinning its tag and for the node's pull."""


class _Cancel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reason: str = ""


class _Prefetch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    image: str


def job_list(jobs: JobService, query: dict[str, list[str]]) -> HttpAnswer:
    """``GET /api/jobs``: newest first, of one node with ``?node_id=``."""
    try:
        limit = min(int(query.get("limit", [str(MAX_LIMIT)])[0]), MAX_LIMIT)
    except ValueError:
        return error(HTTPStatus.BAD_REQUEST, "limit is an integer")
    if limit < 1:
        return error(HTTPStatus.BAD_REQUEST, "limit >= 1")
    node_id = query.get("node_id", [None])[0]
    return json_answer(
        {"jobs": [_summary(jobs, j) for j in jobs.recent(node_id=node_id, limit=limit)]}
    )


def job_detail(jobs: JobService, job_id: str, connected: Collection[str]) -> HttpAnswer:
    """``GET /api/jobs/{id}``."""
    job = jobs.get(job_id)
    if job is None:
        return json_answer(
            {"error": {"code": "unknown_job", "detail": f"no job {job_id!r}"}},
            HTTPStatus.NOT_FOUND,
        )
    return json_answer(_detail(jobs, job, connected))


async def submit(jobs: JobService, body: bytes) -> HttpAnswer:
    """``POST /api/jobs``: sign and send an offer.

    Raises:
        JobError: as :meth:`JobService.submit`, or ``bad_request``.
    """
    request = _decode(body or b"null", _Submit)
    job_id = await jobs.submit(
        request.node_id,
        request.spec,
        job_id=request.job_id,
        ttl_s=request.ttl_s,
        uploads=request.uploads,
        registry_logins=request.registry_logins,
    )
    return json_answer({"job_id": job_id, "url": f"/api/jobs/{job_id}"}, HTTPStatus.CREATED)


def job_output(jobs: JobService, job_id: str, path: str) -> HttpAnswer:
    """``GET /api/jobs/{id}/outputs/{path}``: an output the node uploaded here."""
    stored = None if jobs.artifacts is None else jobs.artifacts.outputs(job_id).get(path)
    if stored is None or jobs.artifacts is None:
        if jobs.artifacts is not None and path in jobs.artifacts.expired(job_id):
            return coded_error(
                HTTPStatus.GONE,
                "output_expired",
                f"output {path!r} of job {job_id!r} was removed by the store's retention",
            )
        return coded_error(
            HTTPStatus.NOT_FOUND, "output_missing", f"no output {path!r} of job {job_id!r} here"
        )
    return HttpAnswer(
        HTTPStatus.OK,
        "application/octet-stream",
        b"",
        headers=(("X-Content-SHA256", stored.sha256),),
        file=(str(jobs.artifacts.file(stored.sha256)), stored.size_bytes),
    )


async def cancel(jobs: JobService, job_id: str, body: bytes) -> HttpAnswer:
    """``POST /api/jobs/{id}/cancel``: send ``job_cancel``; the body may be empty.

    Raises:
        JobError: as :meth:`JobService.cancel`, or ``bad_request``.
    """
    request = _decode(body, _Cancel) if body else _Cancel()
    await jobs.cancel(job_id, request.reason)
    return json_answer({"job_id": job_id}, HTTPStatus.ACCEPTED)


async def prefetch(jobs: JobService, node_id: str, body: bytes) -> HttpAnswer:
    """``POST /api/nodes/{id}/prefetch`` ``{"image"}``: send ``image_prefetch``.

    Raises:
        JobError: as :meth:`JobService.prefetch`, or ``bad_request``.
    """
    request = _decode(body or b"null", _Prefetch)
    image = await jobs.prefetch(node_id, request.image)
    return json_answer({"node_id": node_id, "image": image}, HTTPStatus.ACCEPTED)


def _decode(body: bytes, kind: type[_T]) -> _T:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as exc:
        raise JobError("bad_request", f"the body is not the expected JSON object: {exc}") from None
    except RecursionError:  # msgspec's own limit: a spec of nested brackets
        raise JobError("bad_request", "the body is nested too deeply") from None


def _summary(jobs: JobService, job: JobSummary) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "job_id": job.job_id,
        "node_id": job.node_id,
        "state": job.state,
        "code": job.code,
        "created": job.created,
        "updated": job.updated,
        "url": f"/api/jobs/{job.job_id}",
    }
    if job.state in ("pulling", "fetching") and (progress := jobs.progress(job)) is not None:
        done, total = ("pulled", "pull") if job.state == "pulling" else ("fetched", "fetch")
        summary[f"{done}_bytes"], summary[f"{total}_bytes"] = progress
    if jobs.artifacts is not None and jobs.artifacts.outputs(job.job_id):
        row = jobs.get(job.job_id)
        if row is not None and (problems := _outputs(jobs, row)["output_problems"]):
            summary["output_problems"] = problems
    return summary


def _detail(jobs: JobService, job: JobRow, connected: Collection[str]) -> dict[str, Any]:
    logs = jobs.logs(job.job_id)
    result = job.result
    return {
        "job_id": job.job_id,
        "node_id": job.node_id,
        "node_connected": job.node_id in connected,
        "state": job.state,
        "code": job.code,
        "detail": job.detail,
        "final": job.final,
        "created": job.created,
        "updated": job.updated,
        "expires_at": job.expires_at,
        "spec": job.spec,
        "offer": _public_offer(job.offer),
        "offer_sha256": job.offer_sha256,
        "cancel": None
        if job.cancel_requested is None
        else {"requested": job.cancel_requested, "reason": job.cancel_reason},
        "logs": {
            "stdout": logs.stdout,
            "stderr": logs.stderr,
            "truncated": logs.truncated,
            "kept_bytes": logs.kept_bytes,
            "dropped_bytes": logs.dropped_bytes,
        },
        "result": None
        if result is None
        else {
            "receipt": result.receipt,
            "receipt_sha256": result.sha256,
            "envelope": result.envelope,
            "verified": True,  # only a receipt signed by the node's key is ever stored
            "chain_ok": result.chain_ok,
            "problems": result.problems,
        },
        **_outputs(jobs, job),
    }


def _public_offer(envelope: dict[str, Any]) -> dict[str, Any]:
    """The signed offer as the read API shows it. Its upload URLs are write credentials (a
    presigned URL's signature, an artifact token) and a registry login is one, and the
    read API is anyone's who reaches the port: an offer with either is shown without its
    payload, its targets without their queries and headers, its registries without their
    logins (``offer_sha256`` still names what was signed)."""
    offer = msgspec.json.decode(crypto.b64decode(envelope["payload"]))
    uploads = offer.get("uploads") or {}
    logins = offer.get("registry_logins") or {}
    if not uploads and not logins:
        return envelope
    shown: dict[str, Any] = {
        "payloadType": envelope.get("payloadType"),
        "payload": None,
        "redacted": "the payload holds credentials",
        "uploads": {path: target["url"].split("?", 1)[0] for path, target in uploads.items()},
    }
    if logins:
        shown["registry_logins"] = sorted(logins)
    return shown


def _outputs(jobs: JobService, job: JobRow) -> dict[str, Any]:
    """What the artifact store holds of the job, and how it differs from the receipt."""
    if jobs.artifacts is None:
        return {"outputs": [], "outputs_expired": [], "output_problems": []}
    stored = jobs.artifacts.outputs(job.job_id)
    expired = jobs.artifacts.expired(job.job_id)
    # The envelope's payload is the offer as signed: which outputs were to come here.
    offer = msgspec.json.decode(crypto.b64decode(job.offer["payload"]))
    ours = {
        path
        for path, target in offer.get("uploads", {}).items()
        if f"/artifacts/{job.job_id}?" in target.get("url", "") and path not in expired
    }
    receipt = job.result.receipt if job.result is not None else {}
    return {
        "outputs": [
            {
                "path": path,
                "sha256": item.sha256,
                "size_bytes": item.size_bytes,
                "url": f"/api/jobs/{job.job_id}/outputs/{path}",
            }
            for path, item in sorted(stored.items())
        ],
        # Removed by retention: not missing (never stored), gone.
        "outputs_expired": [
            {"path": path, "expired": when} for path, when in sorted(expired.items())
        ],
        "output_problems": output_problems(receipt, stored, ours) if job.result else [],
    }
