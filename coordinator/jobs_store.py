"""The job tables of the coordinator's store: offers, states, bounded logs, receipts.

Its tables share the store's connection and transactions:

- an offer (or a cancel) and its row in the coordinator's outbound stream commit together,
  so a job is never stored without its message, nor a message sent without its job;
- what an agent reports about a job (:data:`JobEvent`) is applied in the transaction that
  stores the message itself, so a resend (dropped by ``(node, seq)``) never applies twice.

A job's state starts as ``offered``; then it is the state of the agent's latest
``job_status`` (:data:`agent.protocol.jobs.JobState`). A job in a final state stays in it.
Logs keep the first :data:`MAX_LOG_BYTES` of UTF-8 per job and count the rest. Receipts
form one hash chain per node: each names the digest of the node's previous receipt; one
that does not is stored with ``chain_broken`` among its problems, and the chain goes on
from it (so one break is reported once, not on every receipt after it).
"""

from __future__ import annotations

import logging
from typing import Any, Final, TypeAlias, get_args

import msgspec

from agent.protocol.jobs import FINAL_STATES, JobState, receipt_digest
from agent.protocol.messages import JobCancelBody, JobLogBody, JobStatusBody
from coordinator.db import Database
from coordinator.errors import JobError
from coordinator.offers import SignedOffer, receipt_problems
from coordinator.stream_store import StreamTable

__all__ = [
    "MAX_LOG_BYTES",
    "OFFERED",
    "JobEvent",
    "JobLogs",
    "JobRow",
    "JobSummary",
    "JobTable",
    "ReceiptChain",
    "StoredReceipt",
    "VerifiedResult",
]

_log = logging.getLogger(__name__)

#: The state of a job the node has not answered yet.
OFFERED: Final = "offered"
#: Log text kept per job (both streams together), in UTF-8 bytes; the rest is counted.
MAX_LOG_BYTES: Final = 1024 * 1024
_AGENT_STATES: Final = frozenset(get_args(JobState))


class VerifiedResult(msgspec.Struct, frozen=True, kw_only=True):
    """A ``job_result`` whose receipt verified with the node's key."""

    job_id: str
    receipt: dict[str, Any]
    envelope: dict[str, Any]


#: What an agent's message says about a job, applied with the message.
JobEvent: TypeAlias = JobStatusBody | JobLogBody | VerifiedResult


class JobSummary(msgspec.Struct, frozen=True, kw_only=True):
    """A job as the list shows it."""

    job_id: str
    node_id: str
    state: str
    code: str
    created: float
    updated: float


class StoredReceipt(msgspec.Struct, frozen=True, kw_only=True):
    """A job's receipt: verified with the node's key, and what else does not hold."""

    receipt: dict[str, Any]
    sha256: str
    """:func:`agent.protocol.jobs.receipt_digest` of it: the next receipt's prev_receipt."""
    envelope: dict[str, Any]
    problems: list[str]
    """Codes of :data:`coordinator.offers.RECEIPT_PROBLEMS`; [] when everything holds."""

    @property
    def chain_ok(self) -> bool:
        """Whether it names the node's previous receipt."""
        return "chain_broken" not in self.problems


class JobRow(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the coordinator knows of one job."""

    job_id: str
    node_id: str
    state: str
    code: str
    detail: str
    spec: dict[str, Any]
    offer: dict[str, Any]
    """The signed DSSE envelope sent in ``job_offer``."""
    offer_sha256: str
    offer_seq: int
    created: float
    updated: float
    expires_at: float
    cancel_requested: float | None
    cancel_reason: str
    result: StoredReceipt | None
    log_bytes: int
    log_dropped_bytes: int

    @property
    def final(self) -> bool:
        """Whether the job will not change state any more."""
        return self.state in FINAL_STATES


class JobLogs(msgspec.Struct, frozen=True, kw_only=True):
    """A job's kept log text per stream, and how much was not kept."""

    stdout: str
    stderr: str
    kept_bytes: int
    dropped_bytes: int

    @property
    def truncated(self) -> bool:
        """Whether some of the log was not kept."""
        return self.dropped_bytes > 0


class ReceiptChain(msgspec.Struct, frozen=True, kw_only=True):
    """A node's receipt chain: its last receipt's digest, how many, how many breaks."""

    last_receipt: str
    receipts: int
    breaks: int


_JOB_COLUMNS = (
    "job_id, node_id, state, code, detail, spec, offer, offer_sha256, offer_seq, created,"
    " updated, expires_at, cancel_requested, cancel_reason, receipt, receipt_sha256,"
    " receipt_envelope, receipt_problems, log_bytes, log_dropped_bytes"
)


def _json(value: object) -> str:
    return msgspec.json.encode(value).decode()


class JobTable:
    """Jobs, their logs, and each node's receipt chain; offers and cancels go out through
    ``streams`` in the same transaction."""

    def __init__(self, db: Database, streams: StreamTable) -> None:
        self._db = db
        self._streams = streams

    # ------------------------------------------------------------------ coordinator -> agent

    def add(self, signed: SignedOffer, now: float) -> int:
        """Store a new job and its ``job_offer`` at once; returns the offer's seq in the
        node's stream.

        Raises:
            JobError: ``job_exists`` when the job id is taken (nothing is stored).
        """
        offer = signed.offer
        with self._db.transaction():
            seq = self._streams.insert_outbound(
                offer.node_id, "job_offer", msgspec.to_builtins(signed.body)
            )
            # DO NOTHING, not a caught error: on PostgreSQL an error ends the transaction.
            added = self._db.execute(
                "INSERT INTO jobs (job_id, node_id, state, spec, offer, offer_sha256,"
                " offer_seq, created, updated, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO NOTHING",
                (
                    offer.job_id,
                    offer.node_id,
                    OFFERED,
                    _json(offer.spec),
                    _json(signed.body.offer),
                    signed.sha256,
                    seq,
                    now,
                    now,
                    offer.expires_at,
                ),
            )
            if added.rowcount != 1:
                raise JobError("job_exists", f"job {offer.job_id!r} exists")
        return seq

    def add_cancel(self, node_id: str, body: JobCancelBody, now: float) -> int:
        """Mark a job's cancel as requested and store its ``job_cancel`` at once; returns
        its seq."""
        with self._db.transaction():
            self._db.execute(
                "UPDATE jobs SET cancel_requested = ?, cancel_reason = ?, updated = ?"
                " WHERE job_id = ?",
                (now, body.reason, now, body.job_id),
            )
            return self._streams.insert_outbound(node_id, "job_cancel", msgspec.to_builtins(body))

    # ------------------------------------------------------------------ reading

    def get(self, job_id: str) -> JobRow | None:
        """One job, or None when there is no such job."""
        row = self._db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        return None if row is None else _job_row(row)

    def recent(self, *, node_id: str | None = None, limit: int = 1000) -> list[JobSummary]:
        """Jobs, newest first (of one node when ``node_id`` is given)."""
        columns = "SELECT job_id, node_id, state, code, created, updated FROM jobs"
        order = " ORDER BY created DESC, rowid DESC LIMIT ?"
        rows = (
            self._db.execute(columns + order, (limit,))
            if node_id is None
            else self._db.execute(columns + " WHERE node_id = ?" + order, (node_id, limit))
        ).fetchall()
        return [
            JobSummary(job_id=r[0], node_id=r[1], state=r[2], code=r[3], created=r[4], updated=r[5])
            for r in rows
        ]

    def logs(self, job_id: str) -> JobLogs:
        """A job's kept log text per stream, in the order it arrived."""
        rows = self._db.execute(
            "SELECT stream, data FROM job_logs WHERE job_id = ? ORDER BY seq", (job_id,)
        ).fetchall()
        counts = self._db.execute(
            "SELECT log_bytes, log_dropped_bytes FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        kept, dropped = (0, 0) if counts is None else (int(counts[0]), int(counts[1]))
        return JobLogs(
            stdout="".join(d for s, d in rows if s == "stdout"),
            stderr="".join(d for s, d in rows if s == "stderr"),
            kept_bytes=kept,
            dropped_bytes=dropped,
        )

    def receipt_chain(self, node_id: str) -> ReceiptChain:
        """A node's receipt chain ("" and zeros before its first receipt)."""
        row = self._db.execute(
            "SELECT last_receipt, receipts, breaks FROM receipt_chain WHERE node_id = ?",
            (node_id,),
        ).fetchone()
        if row is None:
            return ReceiptChain(last_receipt="", receipts=0, breaks=0)
        return ReceiptChain(last_receipt=row[0], receipts=row[1], breaks=row[2])

    # ------------------------------------------------------------------ agent -> coordinator

    def apply(self, node_id: str, seq: int, event: JobEvent, now: float) -> None:
        """Apply what a just-stored message says about a job (in its transaction)."""
        row = self._db.execute(
            "SELECT state, offer_sha256, log_bytes FROM jobs WHERE job_id = ? AND node_id = ?",
            (event.job_id, node_id),
        ).fetchone()
        if isinstance(event, VerifiedResult):
            self._apply_result(node_id, event, None if row is None else str(row[1]), now)
        elif row is None:
            # A refusal of a forged offer, or a job of another node: the message is kept,
            # no job changes.
            _log.info("%s: %s about unknown job %r", node_id, type(event).__name__, event.job_id)
        elif isinstance(event, JobStatusBody):
            self._apply_status(node_id, event, str(row[0]), now)
        else:
            self._apply_log(event, seq, int(row[2]), now)

    def _apply_status(self, node_id: str, event: JobStatusBody, state: str, now: float) -> None:
        if state in FINAL_STATES:
            _log.info(
                "%s: job %s is %s already; %s ignored", node_id, event.job_id, state, event.state
            )
            return
        if event.state not in _AGENT_STATES:
            _log.warning("%s: job %s: unknown state %r", node_id, event.job_id, event.state)
            return
        self._db.execute(
            "UPDATE jobs SET state = ?, code = ?, detail = ?, updated = ? WHERE job_id = ?",
            (event.state, event.code, event.detail, now, event.job_id),
        )

    def _apply_log(self, event: JobLogBody, seq: int, kept: int, now: float) -> None:
        data = event.data.encode()
        room = max(MAX_LOG_BYTES - kept, 0)
        keep = data[:room].decode(errors="ignore")  # never half a character
        kept_now = len(keep.encode())
        if keep:
            self._db.execute(
                "INSERT INTO job_logs (job_id, seq, stream, data) VALUES (?, ?, ?, ?)",
                (event.job_id, seq, event.stream, keep),
            )
        self._db.execute(
            "UPDATE jobs SET log_bytes = log_bytes + ?,"
            " log_dropped_bytes = log_dropped_bytes + ?, updated = ? WHERE job_id = ?",
            (kept_now, len(data) - kept_now, now, event.job_id),
        )

    def _apply_result(
        self, node_id: str, event: VerifiedResult, offer_sha256: str | None, now: float
    ) -> None:
        chain = self.receipt_chain(node_id)
        problems = receipt_problems(
            event.receipt,
            job_id=event.job_id,
            node_id=node_id,
            offer_sha256=offer_sha256,
            prev_receipt=chain.last_receipt,
        )
        digest = receipt_digest(event.receipt)
        broken = int("chain_broken" in problems)
        # Every verified receipt of the node extends its chain, even one about no job of
        # ours: the chain is the node's, and the next receipt names this one.
        self._db.execute(
            "INSERT INTO receipt_chain (node_id, last_receipt, receipts, breaks)"
            " VALUES (?, ?, 1, ?) ON CONFLICT (node_id) DO UPDATE SET"
            " last_receipt = excluded.last_receipt, receipts = receipt_chain.receipts + 1,"
            " breaks = receipt_chain.breaks + excluded.breaks",
            (node_id, digest, broken),
        )
        if problems:
            _log.warning("%s: receipt for %s: %s", node_id, event.job_id, ", ".join(problems))
        if offer_sha256 is None:
            return
        self._db.execute(
            "UPDATE jobs SET receipt = ?, receipt_sha256 = ?, receipt_envelope = ?,"
            " receipt_problems = ?, updated = ? WHERE job_id = ?",
            (
                _json(event.receipt),
                digest,
                _json(event.envelope),
                _json(problems),
                now,
                event.job_id,
            ),
        )


def _job_row(r: tuple[Any, ...]) -> JobRow:
    result = (
        None
        if r[14] is None
        else StoredReceipt(
            receipt=msgspec.json.decode(r[14]),
            sha256=r[15],
            envelope=msgspec.json.decode(r[16]),
            problems=msgspec.json.decode(r[17]),
        )
    )
    return JobRow(
        job_id=r[0],
        node_id=r[1],
        state=r[2],
        code=r[3],
        detail=r[4],
        spec=msgspec.json.decode(r[5]),
        offer=msgspec.json.decode(r[6]),
        offer_sha256=r[7],
        offer_seq=r[8],
        created=r[9],
        updated=r[10],
        expires_at=r[11],
        cancel_requested=r[12],
        cancel_reason=r[13],
        result=result,
        log_bytes=r[18],
        log_dropped_bytes=r[19],
    )
