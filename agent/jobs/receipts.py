"""What a node attests about a job that ended: its receipt, made from what is known.

Pure: the manager (:mod:`agent.jobs.manager`) gives the offer, the runner's result (or
only the ledger's record, for a job a crash cut short) and the digest of the node's
previous receipt, and signs what these return.
"""

from __future__ import annotations

import msgspec

from agent.jobs.ledger import JobRecord
from agent.protocol.jobs import JobState, Offer, OutputDigest, Receipt, offer_digest
from sandbox.errors import SandboxError
from sandbox.events import JobResult
from sandbox.spec import load_spec, spec_digest

__all__ = ["of_record", "of_result"]


def of_result(
    offer: Offer,
    node_id: str,
    units: list[str],
    result: JobResult,
    *,
    state: JobState,
    code: str,
    prev: str,
) -> Receipt:
    """The receipt of a job the runner ran (or tried to) to ``result``."""
    return Receipt(
        job_id=offer.job_id,
        node_id=node_id,
        state=state,
        code=code,
        offer_sha256=offer_digest(offer),
        spec_digest=result.spec_digest,
        image_id=result.image_id,
        gpus=units,
        exit_code=result.exit_code,
        started_at=result.started_at,
        finished_at=result.finished_at,
        cpu_seconds=result.cpu_seconds,
        peak_memory_bytes=result.peak_memory_bytes,
        outputs=[
            OutputDigest(path=o.path, status=o.status, size_bytes=o.size_bytes, sha256=o.sha256)
            for o in result.outputs
        ],
        log_sha256=result.log_sha256,
        log_bytes=result.log_bytes,
        log_dropped_bytes=result.log_dropped_bytes,
        prev_receipt=prev,
    )


def of_record(record: JobRecord, node_id: str, *, state: JobState, code: str, prev: str) -> Receipt:
    """The receipt of a job the agent lost track of (a crash): nothing is known of its run
    but what the ledger kept."""
    try:
        offer = msgspec.json.decode(record.offer, type=Offer)
        digest = spec_digest(load_spec(msgspec.json.encode(offer.spec), "json"))
        offer_sha = offer_digest(offer)
    except (msgspec.DecodeError, SandboxError):  # accepted, so it parsed then
        offer_sha, digest = "0" * 64, ""
    return Receipt(
        job_id=record.job_id,
        node_id=node_id,
        state=state,
        code=code,
        offer_sha256=offer_sha,
        spec_digest=digest,
        gpus=record.gpus,
        prev_receipt=prev,
    )
