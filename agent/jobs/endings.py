"""How a job ends: its final state and its signed receipt, stored and queued together,
after its outputs' uploads when its offer names targets for them.

The job manager (:mod:`agent.jobs.manager`) hands each job's result here; the decisions
are the pure machine's (:mod:`agent.jobs.machine`: ``upload``, ``uploaded``, ``finish``),
carried out through the manager's ``carry_out``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec

from agent.jobs import machine, receipts
from agent.jobs.delivery import Delivery
from agent.jobs.ledger import JobRecord, Ledger
from agent.jobs.machine import Decision, Upload
from agent.jobs.node import NodeState
from agent.link.identity import Identity
from agent.protocol import dsse
from agent.protocol.jobs import JobState, Offer, Receipt, receipt_digest
from sandbox.events import JobResult

__all__ = ["Endings", "StopReason"]

_log = logging.getLogger(__name__)

#: Why the agent itself stopped a job; the runner reports each as "cancelled".
StopReason = Literal["cancelled", "interrupted", "preempted"]


class Endings:
    """Ends jobs: receipts signed with the node's key, uploads first where there are any.

    ``stops`` is the manager's own map of the jobs it is stopping, and why: read (and a
    job's entry dropped) as the job ends.
    """

    def __init__(
        self,
        *,
        identity: Identity,
        ledger: Ledger,
        node: NodeState,
        delivery: Delivery | None,
        carry_out: Callable[[Decision], None],
        state: Callable[[str], str],
        stops: dict[str, StopReason],
    ) -> None:
        self.identity = identity
        self.ledger = ledger
        self.node = node
        self.delivery = delivery
        self.carry_out = carry_out
        self.state = state
        self.stops = stops

    async def deliver(self, upload: Upload) -> None:
        """PUT a job's outputs, then sign and send its receipt; a shutdown leaves it
        ``uploading`` for the next start."""
        job_id = upload.job_id
        assert self.delivery is not None  # only an offer it could spool has uploads
        try:
            receipt, detail = await self.delivery.deliver(
                upload,
                lambda path: self.carry_out(machine.uploaded(job_id, path)),
                cancelled=lambda: self.stops.get(job_id) == "cancelled",
            )
        finally:
            self.stops.pop(job_id, None)  # a preemption asked meanwhile changes nothing
        receipt = msgspec.structs.replace(receipt, prev_receipt=self.ledger.last_receipt_digest())
        self._commit("uploading", receipt, detail, receipt.exit_code, upload.spool)
        _log.info("job %s ended %s after its uploads", job_id, receipt.state)

    async def finish(
        self, offer: Offer, units: list[str], result: JobResult, keep: Path | None
    ) -> None:
        """The job's receipt and final state, stored and queued together; first, when its
        offer names targets for outputs it left, their uploads."""
        job_id = offer.job_id
        stopped_by = self.stops.pop(job_id, None)
        state: JobState = result.reason
        if result.reason == "cancelled" and stopped_by is not None:
            state = stopped_by
        if offer.spec.get("kind") == "service" and state not in ("error", "interrupted"):
            state = "stopped"  # why is its code: lease_expired, restart_limit, cancelled, ...
        code = result.error_code or ("" if state == "completed" else state)
        receipt = receipts.of_result(
            offer,
            self.identity.node_id,
            units,
            result,
            state=state,
            code=code,
            prev=self.ledger.last_receipt_digest(),
        )
        spool = None if keep is None else str(keep)
        if spool is not None and (
            held := machine.upload(
                job_id,
                self.state(job_id),
                receipt,
                detail=result.detail,
                targets=offer.uploads,
                spool=spool,
            )
        ):
            self.node.free(job_id)  # uploads hold no GPU
            self.node.changed()
            self.carry_out(held)
            assert held.upload is not None  # machine.upload made one
            await self.deliver(held.upload)
            return
        self._commit(self.state(job_id), receipt, result.detail, result.exit_code, spool)
        _log.info("job %s ended %s%s", job_id, state, f" ({code})" if code else "")

    def finish_unrun(self, record: JobRecord, state: JobState, code: str, detail: str) -> None:
        """A receipt for a job the agent lost track of (a crash)."""
        receipt = receipts.of_record(
            record,
            self.identity.node_id,
            state=state,
            code=code,
            prev=self.ledger.last_receipt_digest(),
        )
        self._commit(record.state, receipt, detail, None)

    def _commit(
        self,
        current: str,
        receipt: Receipt,
        detail: str,
        exit_code: int | None,
        spool: str | None = None,
    ) -> None:
        identity = self.identity
        envelope = dsse.attest_receipt(
            msgspec.to_builtins(receipt),
            identity.node_id,
            identity.private_key,
            identity.key_id,
        )
        decision = machine.finish(
            receipt.job_id,
            current,
            receipt.state,
            code=receipt.code,
            detail=detail,
            exit_code=exit_code,
            envelope=msgspec.json.encode(envelope),
            digest=receipt_digest(receipt),
            spool=spool,
        )
        self.carry_out(decision)
