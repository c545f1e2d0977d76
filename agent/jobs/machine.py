"""A job's life as a pure state machine: what each event decides, as data.

Nothing here touches the ledger, the outbox, the engine or the clock. Each function takes
what is known (the job's state, the event) and returns a :class:`Decision`: the ledger rows
to write, the messages to queue for the coordinator, and the container to start, if any.
The job manager (:mod:`agent.jobs.manager`) carries a decision out in one outbox
transaction, then starts what it names: jobs flow one way, from event to decision to I/O.

The states and the moves between them (:data:`TRANSITIONS`)::

    (new) --> accepted --> [fetching] --> [pulling] --> running --> [uploading] --> ended
      |          |             |              |            \\----------------> ended
      |          \\-------------+--------------+----------------> cancelled | ... | error
      \\--> refused

    (a service) ... --> starting <--> ready <--> unhealthy --> restarting --> starting ...
                          \\------------+------------+---------------> stopped | ... | error

(``fetching``: the job's inputs given by URL; ``pulling``: its image; ``uploading``: its
outputs, to the offer's targets; each only when needed. ``ended`` is any final state but
``refused``; ``...`` the others of :data:`TRANSITIONS`.)

``uploading``: the job ended and its outputs are PUT to the offer's targets from the spool;
its final state is only written (and its receipt only signed and sent) once every upload
was acknowledged, or ``error`` (``upload_failed``) once one cannot be. A restart resumes
it (:func:`resume`) rather than calling it interrupted.

A move the table does not hold is refused with :class:`~agent.errors.JobStateError`
(``bad_transition``): a bug or a confused runner must not rewrite a finished job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final, NamedTuple

import msgspec

from agent.errors import JobStateError
from agent.protocol.bodies import (
    EnvelopeBody,
    InputProgress,
    JobLogBody,
    JobResultBody,
    JobStatusBody,
    LayerProgress,
)
from agent.protocol.jobs import FINAL_STATES, JobState, Offer, Receipt, UploadTarget
from agent.protocol.limits import (
    MAX_ERROR_DETAIL_CHARS,
    MAX_PROGRESS_INPUTS,
    MAX_PROGRESS_LAYERS,
    MAX_PROGRESS_PATH_CHARS,
    MAX_SEQ,
)
from sandbox.spec import WorkloadSpec

__all__ = [
    "TRANSITIONS",
    "ContainerOf",
    "Decision",
    "ImagePulled",
    "ImageRemoved",
    "ImageUsed",
    "Logs",
    "NewJob",
    "PruneLogs",
    "Receipted",
    "Row",
    "Start",
    "Transition",
    "Upload",
    "Uploaded",
    "Uploading",
    "accept",
    "advance",
    "answer_known",
    "fetching",
    "finish",
    "forward_logs",
    "pulling",
    "refuse",
    "resume",
    "upload",
    "uploaded",
]

_STOPPED: Final = frozenset({"cancelled", "interrupted", "preempted", "error"})
_ENDED: Final = frozenset({"completed", "failed", "timeout", "oom_killed"}) | _STOPPED
_SERVING: Final = _STOPPED | {"restarting", "stopped"}

#: Where a job may go from each state; ``None`` is a job the ledger does not have yet.
#: Final states go nowhere.
TRANSITIONS: Final[Mapping[str | None, frozenset[str]]] = {
    None: frozenset({"accepted", "refused"}),
    "accepted": frozenset({"fetching", "pulling", "running", "starting"}) | _STOPPED,
    "fetching": frozenset({"pulling", "running", "starting"}) | _STOPPED,
    "pulling": frozenset({"running", "starting"}) | _STOPPED,
    "running": _ENDED | {"uploading"},
    "uploading": _ENDED,
    # A service: its server's health, then ``stopped`` (or the agent's own ends).
    "starting": _SERVING | {"ready"},
    "ready": _SERVING | {"unhealthy"},
    "unhealthy": _SERVING | {"ready"},
    "restarting": _STOPPED | {"starting", "stopped"},
    **{state: frozenset() for state in FINAL_STATES},
}


# -- ledger rows, as data: agent.jobs.ledger writes them ----------------------------------


class NewJob(msgspec.Struct, frozen=True, kw_only=True):
    """A job the ledger did not have: accepted (its offer, its GPUs) or refused."""

    job_id: str
    state: JobState
    offer: bytes = b""
    gpus: tuple[str, ...] = ()
    code: str = ""
    detail: str = ""


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    """A job's new state."""

    job_id: str
    state: JobState
    code: str = ""
    detail: str = ""
    exit_code: int | None = None


class ContainerOf(msgspec.Struct, frozen=True):
    """The container a job runs in, so that a restart knows what was there."""

    job_id: str
    container_id: str


class Logs(msgspec.Struct, frozen=True):
    """Output chunks ``(stream, text)`` appended to a job's stored log."""

    job_id: str
    chunks: tuple[tuple[str, str], ...]


class Receipted(msgspec.Struct, frozen=True):
    """A job's signed receipt: the new head of the node's receipt chain."""

    job_id: str
    envelope: bytes
    digest: str


class ImagePulled(msgspec.Struct, frozen=True):
    """An image the agent pulled, now in its cache (``used`` at ``now``)."""

    reference: str
    image_id: str
    size: int


class ImageUsed(msgspec.Struct, frozen=True):
    """A cached image a job starts from: the most recently used now."""

    reference: str


class ImageRemoved(msgspec.Struct, frozen=True):
    """A cached image removed from the engine to keep within the budget."""

    reference: str


class PruneLogs(msgspec.Struct, frozen=True):
    """Forget the output of jobs that ended before ``before`` (their receipts stay)."""

    before: float


class Uploading(msgspec.Struct, frozen=True, kw_only=True):
    """A job whose outputs wait in ``spool`` for upload, and what its receipt will say:
    ``receipt`` (unsigned, its ``prev_receipt`` set when it is signed) and ``detail``."""

    job_id: str
    receipt: bytes
    detail: str
    spool: str


class Uploaded(msgspec.Struct, frozen=True):
    """One output the store acknowledged: a resumed upload does not send it again."""

    job_id: str
    path: str


Row = (
    NewJob
    | Transition
    | ContainerOf
    | Logs
    | Receipted
    | PruneLogs
    | ImagePulled
    | ImageUsed
    | ImageRemoved
    | Uploading
    | Uploaded
)


class Upload(NamedTuple):
    """Outputs to PUT once the decision is on disk: ``(index, path, target, size, sha256)``
    each, the file being ``spool/<index>``; then the held receipt is signed and sent."""

    job_id: str
    receipt: Receipt
    detail: str
    spool: str
    files: tuple[tuple[int, str, UploadTarget, int, str], ...]


class Start(NamedTuple):
    """A container to start once the decision is on disk."""

    job_id: str
    offer: Offer
    spec: WorkloadSpec
    units: tuple[str, ...]


class Decision(NamedTuple):
    """What one event decided: rows and messages committed together, then ``start``."""

    rows: tuple[Row, ...] = ()
    messages: tuple[tuple[str, bytes], ...] = ()
    start: Start | None = None
    upload: Upload | None = None
    discard: str | None = None
    """A spool directory to remove once the decision is on disk."""


# -- the events ----------------------------------------------------------------------------


def accept(offer: Offer, payload: bytes, spec: WorkloadSpec, units: Iterable[str]) -> Decision:
    """A verified, admitted offer whose GPUs are reserved: recorded ``accepted``, answered,
    and started once both are on disk (nothing runs that the coordinator will not hear of)."""
    gpus = tuple(units)
    job_id = offer.job_id
    _check(job_id, None, "accepted")
    return Decision(
        rows=(NewJob(job_id=job_id, state="accepted", offer=payload, gpus=gpus),),
        messages=(_status(job_id, "accepted"),),
        start=Start(job_id, offer, spec, gpus),
    )


def refuse(job_id: str, code: str, detail: str, *, verified: bool) -> Decision:
    """An offer refused. Only a verified offer's id is recorded: the unsigned id of a
    forged one must not use up the id of the genuine offer to come."""
    _check(job_id, None, "refused")
    detail = detail[:MAX_ERROR_DETAIL_CHARS]
    message = _status(job_id, "refused", code, detail)
    if not verified:
        return Decision(messages=(message,))
    row = NewJob(job_id=job_id, state="refused", code=code, detail=detail)
    return Decision(rows=(row,), messages=(message,))


def answer_known(job_id: str, state: str) -> Decision:
    """The same job id offered again (a coordinator that lost its ack): ids run once, so
    the answer is the job's current state, and nothing is written or run."""
    return Decision(messages=(_status(job_id, state, "duplicate_offer", "job id known"),))


def advance(
    job_id: str, current: str, state: JobState, code: str = "", detail: str = ""
) -> Decision:
    """A job moves on (``running``), recorded and reported together."""
    _check(job_id, current, state)
    detail = detail[:MAX_ERROR_DETAIL_CHARS]
    return Decision(
        rows=(Transition(job_id=job_id, state=state, code=code, detail=detail),),
        messages=(_status(job_id, state, code, detail),),
    )


def pulling(job_id: str, current: str, layers: Mapping[str, tuple[int, int]]) -> Decision:
    """The image's download so far (layer -> bytes done, total): the first report moves
    the job to ``pulling``; the next ones are progress only, nothing written."""
    progress = [
        LayerProgress(layer=layer[:128], done=_count(done), total=_count(total))
        for layer, (done, total) in sorted(layers.items())[:MAX_PROGRESS_LAYERS]
    ]
    body = JobStatusBody(job_id=job_id, state="pulling", progress=progress)
    return _progress(job_id, current, "pulling", body)


def fetching(job_id: str, current: str, inputs: Mapping[str, tuple[int, int]]) -> Decision:
    """The URL inputs' fetch so far (path -> bytes done, size): the first report moves the
    job to ``fetching``; the next ones are progress only, nothing written."""
    rows = [
        InputProgress(path=path[:MAX_PROGRESS_PATH_CHARS], done=_count(done), total=_count(total))
        for path, (done, total) in sorted(inputs.items())[:MAX_PROGRESS_INPUTS]
    ]
    body = JobStatusBody(job_id=job_id, state="fetching", inputs=rows)
    return _progress(job_id, current, "fetching", body)


def _progress(job_id: str, current: str, state: JobState, body: JobStatusBody) -> Decision:
    """A progress report: the first moves the job to ``state``; the next are only sent."""
    message = ("job_status", msgspec.json.encode(body))
    if current == state:
        return Decision(messages=(message,))
    _check(job_id, current, state)
    return Decision(rows=(Transition(job_id=job_id, state=state),), messages=(message,))


def finish(
    job_id: str,
    current: str,
    state: JobState,
    *,
    code: str,
    detail: str,
    exit_code: int | None,
    envelope: bytes,
    digest: str,
    spool: str | None = None,
) -> Decision:
    """A job's end: its final state and its signed receipt, stored and queued together;
    its ``spool``, if any, removed after (the store has the outputs, or never will)."""
    _check(job_id, current, state)
    detail = detail[:MAX_ERROR_DETAIL_CHARS]
    result = JobResultBody(job_id=job_id, receipt=msgspec.json.decode(envelope, type=EnvelopeBody))
    return Decision(
        rows=(
            Transition(job_id=job_id, state=state, code=code, detail=detail, exit_code=exit_code),
            Receipted(job_id, envelope, digest),
        ),
        messages=(
            ("job_result", msgspec.json.encode(result)),
            _status(job_id, state, code, detail),
        ),
        discard=spool,
    )


def upload(
    job_id: str,
    current: str,
    receipt: Receipt,
    *,
    detail: str,
    targets: Mapping[str, UploadTarget],
    spool: str,
) -> Decision | None:
    """A job that ended with outputs to deliver: held ``uploading`` with its receipt's
    makings, and its uploads started. None when no collected output has a target."""
    files = _pending(receipt, targets, frozenset())
    if not files:
        return None
    _check(job_id, current, "uploading")
    held = Uploading(
        job_id=job_id, receipt=msgspec.json.encode(receipt), detail=detail, spool=spool
    )
    return Decision(
        rows=(Transition(job_id=job_id, state="uploading"), held),
        messages=(_status(job_id, "uploading"),),
        upload=Upload(job_id, receipt, detail, spool, files),
    )


def resume(
    job_id: str, held: Uploading, targets: Mapping[str, UploadTarget], done: frozenset[str]
) -> Decision:
    """After a restart, a job left ``uploading``: its uploads again, but those acknowledged."""
    receipt = msgspec.json.decode(held.receipt, type=Receipt)
    files = _pending(receipt, targets, done)
    return Decision(upload=Upload(job_id, receipt, held.detail, held.spool, files))


def uploaded(job_id: str, path: str) -> Decision:
    """One output acknowledged by its store."""
    return Decision(rows=(Uploaded(job_id, path),))


def _pending(
    receipt: Receipt, targets: Mapping[str, UploadTarget], done: frozenset[str]
) -> tuple[tuple[int, str, UploadTarget, int, str], ...]:
    return tuple(
        (index, item.path, targets[item.path], item.size_bytes, item.sha256)
        for index, item in enumerate(receipt.outputs)
        if item.status == "ok"
        and item.sha256 is not None
        and item.path in targets
        and item.path not in done
    )


def forward_logs(job_id: str, chunks: Iterable[tuple[str, str]]) -> Decision:
    """Output chunks: stored in the ledger and queued as ``job_log`` messages."""
    rows = tuple(chunks)
    messages = tuple(
        ("job_log", msgspec.json.encode(JobLogBody(job_id=job_id, stream=stream, data=data)))  # type: ignore[arg-type]
        for stream, data in rows
    )
    return Decision(rows=(Logs(job_id, rows),), messages=messages)


def _count(n: int) -> int:
    """A byte count from the engine, within what the wire carries."""
    return min(max(0, n), MAX_SEQ)


def _check(job_id: str, current: str | None, state: str) -> None:
    if state not in TRANSITIONS.get(current, frozenset()):
        raise JobStateError("bad_transition", f"job {job_id}: {current or '(new)'} -> {state}")


def _status(job_id: str, state: str, code: str = "", detail: str = "") -> tuple[str, bytes]:
    body = JobStatusBody(job_id=job_id, state=state, code=code, detail=detail)
    return "job_status", msgspec.json.encode(body)
