"""The local control API's wire format: views, requests, answers, events, and the daemon side.

Sans-I/O: what goes over the unix socket (``agent.control.server`` serves it,
``agent.control.client`` speaks it; ``docs/control-api.md`` is the reference). One JSON
object a line, in UTF-8::

    -> {"id": 1, "method": "status", "params": {}}
    <- {"id": 1, "result": {...StatusView...}}
    <- {"id": 2, "error": {"code": "unknown_job", "message": "..."}}
    <- {"event": "state", "data": {...StatusView...}}          after "subscribe"
    <- {"id": 3, "event": "log", "data": {"stream": "stdout", "data": "..."}}   "logs"

Error codes (``ControlError.code``):

    bad_json          the line is not JSON in UTF-8 (the connection stays usable)
    bad_request       JSON, but not a request object (id, method, params)
    line_too_long     a request line over MAX_REQUEST_BYTES; skipped to its newline
    unknown_method    no such method
    bad_params        the params do not fit the method
    unknown_job       no job has that id
    permission_denied the peer may not use the socket (the connection is then closed)
    internal_error    the daemon failed to answer; its log says why
    too_many_connections  the daemon serves as many connections as it may (then closed)
    idle_timeout      no request, or an unfinished one, for too long (then closed)
    -- raised by the client only --
    daemon_not_running  no socket, or nobody answering on it
    connection_lost     the daemon closed the connection mid-answer
    bad_response        the daemon sent something this client cannot read
    timeout             no answer in time
    -- raised by the server at start only --
    socket_in_use       another daemon answers on the socket
    unknown_group       the configured socket group does not exist
    bad_socket_path     the path is too long for a unix socket, or not a socket
    socket_error        the socket cannot be created, chmod'ed or chgrp'ed
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Final, Literal, Protocol

import msgspec
from msgspec import UNSET, Meta, UnsetType

from agent.control.args import MAX_JOB_ID_CHARS, MAX_JOBS_LIMIT
from agent.owner.policy import MAX_PAUSE_UNTIL, OwnerPolicy

__all__ = [
    "MAX_JOBS_LIMIT",
    "MAX_PAUSE_UNTIL",
    "MAX_REQUEST_BYTES",
    "METHODS",
    "Call",
    "ConnectionState",
    "ControlTarget",
    "ErrorBody",
    "Frame",
    "GpuHealth",
    "GpuView",
    "JobView",
    "JobsParams",
    "LineSplitter",
    "LogChunkView",
    "LogsParams",
    "NoParams",
    "PauseParams",
    "Refusal",
    "RequestId",
    "StatusView",
    "encode_error",
    "encode_event",
    "encode_request",
    "encode_result",
    "parse_request",
]

MAX_REQUEST_BYTES: Final = 64 * 1024
"""The longest request line the daemon reads; requests are small."""

ConnectionState = Literal["connected", "connecting", "offline"]
GpuHealth = Literal["healthy", "unhealthy", "initialising"]
RequestId = int | Annotated[str, Meta(max_length=128)]


class GpuView(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One GPU as the daemon sees it.

    Attributes:
        index: its position in the profile.
        health: ``initialising`` until its first health check; ``unhealthy`` GPUs take
            no jobs and ``health_reason`` says why (e.g. ``xid 79``).
        assigned_job: the job that holds it, if any.
        temperature_c: the last reading, if the GPU reports one.
        utilization_pct: the last GPU utilisation reading (0 to 100), if any.
        power_limit: what became of the owner's power limit on it (``set: 200 W``,
            ``unsupported: ...``, ``permission_denied: ...``); "" when none is asked.
    """

    index: int
    uuid: str
    name: str
    vendor: str
    health: GpuHealth
    health_reason: str = ""
    assigned_job: str | None = None
    temperature_c: float | None = None
    utilization_pct: float | None = None
    power_limit: str = ""


class JobView(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A job's summary; ``code``/``detail`` say why it failed, was refused or interrupted.

    Attributes:
        gpus: the UUIDs of the GPUs it was given.
        created_at: when the offer arrived (Unix seconds).
        updated_at: when its state last changed (Unix seconds).
        exit_code: the container's exit code, once it has one.
        pulled_bytes, pull_bytes: while ``pulling``, the image's bytes downloaded so far
            and in all (the layers' totals the engine announced so far).
        fetched_bytes, fetch_bytes: while ``fetching``, the URL inputs' bytes fetched so
            far (a cached input counts as whole) and in all.
    """

    job_id: str
    state: str
    gpus: list[str] = []
    created_at: float
    updated_at: float
    exit_code: int | None = None
    code: str = ""
    detail: str = ""
    pulled_bytes: int | None = None
    pull_bytes: int | None = None
    fetched_bytes: int | None = None
    fetch_bytes: int | None = None

    @property
    def shown_state(self) -> str:
        """The state, with how far a pull or a fetch is: ``pulling 45%``."""
        if self.state == "pulling" and self.pull_bytes:
            done = min(self.pulled_bytes or 0, self.pull_bytes)
            return f"pulling {100 * done // self.pull_bytes}%"
        if self.state == "fetching" and self.fetch_bytes:
            done = min(self.fetched_bytes or 0, self.fetch_bytes)
            return f"fetching {100 * done // self.fetch_bytes}%"
        return self.state


class StatusView(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The daemon at a glance: the answer to ``status`` and every ``state`` event.

    Attributes:
        connection: ``connected`` to the coordinator, ``connecting`` (handshake or
            backoff), or ``offline``; ``connection_error`` says why it is not connected.
        paused: takes no new jobs; ``pause_reason`` says who or what paused it.
        paused_until: when a timed pause by the owner ends (Unix seconds), if it is one.
        draining: paused with ``drain`` and jobs are still running.
        guard: the owner control that holds sharing back now (``owner_active``,
            ``gpu_in_use``, ``idle_unknown``, ``too_hot``, ``outside_schedule``), or "";
            ``guard_detail`` says it in words.
        jobs: the running jobs.
        outbox_depth: messages stored but not yet acknowledged by the coordinator.
        jobs_done_today: jobs that ended since local midnight.
    """

    agent_version: str
    node_id: str
    connection: ConnectionState
    coordinator_url: str
    connection_error: str = ""
    paused: bool = False
    pause_reason: str = ""
    paused_until: float | None = None
    draining: bool = False
    guard: str = ""
    guard_detail: str = ""
    gpus: list[GpuView] = []
    jobs: list[JobView] = []
    outbox_depth: int = 0
    jobs_done_today: int = 0


class LogChunkView(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A piece of a job's output, in order within its stream."""

    stream: Literal["stdout", "stderr"]
    data: str


class ControlTarget(Protocol):
    """What the daemon offers the control API. Methods raise ``ControlError`` (e.g.
    ``unknown_job``) for a coded answer; anything else is answered ``internal_error``."""

    def status(self) -> StatusView:
        """The daemon's state now."""
        ...

    async def pause(self, drain: bool, until: float | None) -> StatusView:
        """Stop taking new jobs, until ``until`` (Unix seconds) or until resumed; with
        ``drain``, return once running jobs have ended.

        The server may cancel the call (its client went away, the server stops): the
        pause must stand all the same.
        """
        ...

    def settings(self) -> OwnerPolicy:
        """The owner's controls in force."""
        ...

    async def set_settings(self, changes: dict[str, Any]) -> OwnerPolicy:
        """Change some of the owner's controls; raise ``ControlError("bad_settings")``
        naming the field when the result is not valid (nothing changes then)."""
        ...

    async def resume(self) -> StatusView:
        """Take jobs again."""
        ...

    def jobs(self, limit: int) -> list[JobView]:
        """The ``limit`` most recent jobs, newest first."""
        ...

    def job(self, job_id: str) -> JobView:
        """One job; ``ControlError("unknown_job")`` if there is none by that id."""
        ...

    def logs(self, job_id: str, follow: bool) -> AsyncIterator[LogChunkView]:
        """The job's stored log chunks in order; with ``follow``, then its new ones until
        it ends. Raises ``unknown_job``. Read storage by position: a slow reader must hold
        back nobody but itself."""
        ...


# ---------------------------------------------------------------------- requests


class NoParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``status``, ``resume`` and ``subscribe`` take no params."""


class PauseParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``pause``: with ``drain``, answer once the running jobs have ended; with ``until``
    (Unix seconds, at most :data:`MAX_PAUSE_UNTIL`), resume by itself then."""

    drain: bool = False
    until: Annotated[float, Meta(ge=0, le=MAX_PAUSE_UNTIL)] | None = None


class SettingsParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``set_settings``: the owner controls to change (keys of ``OwnerPolicy``), others
    left as they are."""

    changes: dict[str, Any]


class JobsParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``jobs``: how many, newest first."""

    limit: Annotated[int, Meta(ge=1, le=MAX_JOBS_LIMIT)] = 20


class LogsParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``logs``: whose; with ``follow``, keep streaming until the job ends."""

    job_id: Annotated[str, Meta(min_length=1, max_length=MAX_JOB_ID_CHARS)]
    follow: bool = False


METHODS: Final[dict[str, type[msgspec.Struct]]] = {
    "status": NoParams,
    "pause": PauseParams,
    "resume": NoParams,
    "jobs": JobsParams,
    "logs": LogsParams,
    "subscribe": NoParams,
    "settings": NoParams,
    "set_settings": SettingsParams,
}
"""Every method and its params."""


class _Request(msgspec.Struct, forbid_unknown_fields=True):
    id: RequestId
    method: str
    params: dict[str, Any] = {}


class Call(msgspec.Struct, frozen=True):
    """A valid request: ``params`` is an instance of ``METHODS[method]``."""

    id: RequestId
    method: str
    params: msgspec.Struct


class Refusal(msgspec.Struct, frozen=True):
    """A line that is not a valid request, and the coded error to answer it with."""

    id: RequestId | None
    code: str
    message: str


_ANY_JSON = msgspec.json.Decoder()
_REQUEST_FIELDS = frozenset(_Request.__struct_fields__)


def parse_request(line: bytes) -> Call | Refusal:
    """Decode one request line (without its newline)."""
    try:
        raw = _ANY_JSON.decode(line)
    except msgspec.DecodeError as exc:
        return Refusal(None, "bad_json", f"not JSON: {exc}")
    except RecursionError:
        # [[[[...]]]]: a line of 64 KiB nests deeper than the decoder goes.
        return Refusal(None, "bad_json", "not JSON: nested too deeply")
    if not isinstance(raw, dict):
        return Refusal(None, "bad_request", "a request is a JSON object")
    # Answer with the caller's id whenever it is a usable one, even if the rest is not.
    request_id = raw.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, int | str):
        request_id = None
    try:
        request = msgspec.convert(raw, _Request)
    except msgspec.ValidationError as exc:
        unknown = sorted(set(raw) - _REQUEST_FIELDS)
        message = f"unknown fields {unknown}" if unknown else str(exc)
        return Refusal(request_id, "bad_request", message)
    params_type = METHODS.get(request.method)
    if params_type is None:
        return Refusal(
            request.id, "unknown_method", f"no method {request.method!r}; one of {sorted(METHODS)}"
        )
    try:
        params = msgspec.convert(request.params, params_type)
    except msgspec.ValidationError as exc:
        return Refusal(request.id, "bad_params", f"{request.method}: {exc}")
    return Call(request.id, request.method, params)


def encode_request(request_id: RequestId, method: str, params: object) -> bytes:
    """One request line; ``params`` is a params struct, a mapping, or None."""
    body: dict[str, object] = {"id": request_id, "method": method, "params": params or {}}
    return msgspec.json.encode(body) + b"\n"


def encode_result(request_id: RequestId, result: object) -> bytes:
    """One answer line; ``result`` is a view, a list of views, or None."""
    return msgspec.json.encode({"id": request_id, "result": result}) + b"\n"


def encode_error(request_id: RequestId | None, code: str, message: str) -> bytes:
    """One error line."""
    error = {"code": code, "message": message}
    return msgspec.json.encode({"id": request_id, "error": error}) + b"\n"


def encode_event(event: str, data: object, request_id: RequestId | None = None) -> bytes:
    """One event line: ``state`` (no id) or ``log`` (the id of the ``logs`` request)."""
    body: dict[str, object] = {"event": event, "data": data}
    if request_id is not None:
        body = {"id": request_id, **body}
    return msgspec.json.encode(body) + b"\n"


# ---------------------------------------------------------------------- answers


class ErrorBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A coded error on the wire."""

    code: str
    message: str


class Frame(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Any line the daemon sends: an answer (``result`` or ``error``) or an ``event``.

    ``result`` and ``data`` stay raw JSON until the caller knows what type to read.
    """

    id: RequestId | None = None
    result: msgspec.Raw | UnsetType = UNSET
    error: ErrorBody | None = None
    event: str | None = None
    data: msgspec.Raw | UnsetType = UNSET


# ---------------------------------------------------------------------- lines


class LineSplitter:
    """Splits a byte stream into lines of at most ``limit`` bytes.

    ``feed`` returns the complete lines (without newline; blank ones dropped), and
    ``None`` in place of each line that was too long: that line's bytes are skipped up to
    its newline, so one oversized request costs one error, not the connection.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes | None]:
        """Take bytes from the stream; return the lines they complete."""
        lines: list[bytes | None] = []
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            if not self._skipping:
                self._buffer += piece
                if len(self._buffer) > self.limit:
                    self._buffer.clear()
                    self._skipping = True
                    lines.append(None)
            if end < 0:
                break
            if not self._skipping and self._buffer.strip():
                lines.append(bytes(self._buffer))
            self._buffer.clear()
            self._skipping = False
            start = end + 1
        return lines

    @property
    def pending(self) -> bool:
        """Whether part of a line has come and its newline not yet."""
        return bool(self._buffer) or self._skipping

    def close(self) -> list[bytes | None]:
        """The stream ended: a last line without its newline still counts."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return [rest] if rest.strip() and not self._skipping else []
