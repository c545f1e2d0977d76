"""A client of the daemon's local control API (the CLI and the tray app use it).

It imports nothing from ``hal`` or ``sandbox``: the tray app talks to the daemon through
this module only (tests/unit/test_layering.py holds it to that).

Example::

    async with await ControlClient.connect(default_socket_path()) as client:
        print((await client.status()).connection)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import warnings
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
import platformdirs

from agent.control.wire import (
    Frame,
    JobsParams,
    JobView,
    LineSplitter,
    LogChunkView,
    LogsParams,
    PauseParams,
    SettingsParams,
    StatusView,
    encode_request,
)
from agent.errors import ControlError
from agent.owner.policy import OwnerPolicy

__all__ = [
    "GROUP_FIX",
    "START_FIX",
    "SYSTEM_SOCKET",
    "TIMEOUT_S",
    "ControlClient",
    "call_sync",
    "default_socket_path",
    "user_socket_path",
    "watch",
]

SYSTEM_SOCKET: Final = Path("/run/gpu-agent/agent.sock")
START_FIX: Final = "start the service: systemctl start gpu-agent"
GROUP_FIX: Final = "join the group: sudo usermod -aG gpu-agent $USER (then log in again)"
TIMEOUT_S: Final = 10.0
"""How long a call waits for its answer unless told otherwise."""
MAX_ANSWER_BYTES: Final = 16 * 1024 * 1024
"""The longest line read from the daemon (a status with many GPUs and jobs fits easily)."""
_FIXES: Final = {"daemon_not_running": START_FIX, "permission_denied": GROUP_FIX}
_READ_SIZE: Final = 64 * 1024

T = TypeVar("T")


def user_socket_path() -> Path:
    """The socket of a user install: in the user's runtime directory."""
    with warnings.catch_warnings():
        # Without XDG_RUNTIME_DIR platformdirs falls back to /tmp/runtime-$UID and says
        # so; the daemon of this user takes the same fallback, so the paths still agree.
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir("gpu-agent")) / "agent.sock"


def default_socket_path() -> Path:
    """The system service's socket if there is one, else this user's."""
    return SYSTEM_SOCKET if SYSTEM_SOCKET.exists() else user_socket_path()


def _error(code: str, detail: str) -> ControlError:
    return ControlError(code, detail, fix=_FIXES.get(code, ""))


class ControlClient:
    """One connection to the daemon. Calls go one at a time; after ``subscribe`` the
    connection only receives states (open another one for calls)."""

    def __init__(
        self, path: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.path = path
        self._reader = reader
        self._writer = writer
        self._splitter = LineSplitter(MAX_ANSWER_BYTES)
        self._lines: list[bytes | None] = []
        self._ids = itertools.count(1)
        self._busy = asyncio.Lock()
        self._subscribed = False
        self._decoder = msgspec.json.Decoder(Frame)

    @classmethod
    async def connect(cls, path: Path, *, timeout: float = 5.0) -> ControlClient:
        """Connect to the daemon's socket. Raises ``ControlError``: daemon_not_running,
        permission_denied (each with its ``fix``), timeout."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=_READ_SIZE)
        except (FileNotFoundError, ConnectionRefusedError):
            raise _error("daemon_not_running", f"nobody answers on {path}") from None
        except PermissionError:
            raise _error("permission_denied", f"you may not use {path}") from None
        except TimeoutError:
            raise _error("timeout", f"{path} did not accept within {timeout} s") from None
        except OSError as exc:
            # An address too long for sun_path is an OSError without an errno.
            raise _error("daemon_not_running", f"{path}: {exc.strerror or exc}") from exc
        return cls(path, reader, writer)

    async def close(self) -> None:
        """Close the connection."""
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ methods

    async def call(
        self,
        method: str,
        params: Mapping[str, object] | msgspec.Struct | None = None,
        *,
        timeout: float | None = TIMEOUT_S,
    ) -> Any:
        """Call ``method``; return its result as plain JSON values (dicts, lists, ...)."""
        return _decode(await self._call(method, params, timeout), Any)

    async def status(self, *, timeout: float | None = TIMEOUT_S) -> StatusView:
        """The daemon's state."""
        return _decode(await self._call("status", None, timeout), StatusView)

    async def pause(
        self, *, drain: bool = False, until: float | None = None, timeout: float | None = TIMEOUT_S
    ) -> StatusView:
        """Stop taking new jobs (until ``until``, Unix seconds, if given); with ``drain``,
        return once the running ones have ended.

        The pause is asked for, and answered, within ``timeout``; only then, with
        ``drain``, is the wait for the jobs (as long as they run) asked for.
        """
        params = PauseParams(until=until)
        status = _decode(await self._call("pause", params, timeout), StatusView)
        if drain:
            params = PauseParams(drain=True, until=until)
            status = _decode(await self._call("pause", params, None), StatusView)
        return status

    async def settings(self, *, timeout: float | None = TIMEOUT_S) -> OwnerPolicy:
        """The owner's controls in force."""
        return _decode(await self._call("settings", None, timeout), OwnerPolicy)

    async def set_settings(
        self, changes: Mapping[str, object], *, timeout: float | None = TIMEOUT_S
    ) -> OwnerPolicy:
        """Change some owner controls; the daemon validates them (``bad_settings``)."""
        params = SettingsParams(changes=dict(changes))
        return _decode(await self._call("set_settings", params, timeout), OwnerPolicy)

    async def resume(self, *, timeout: float | None = TIMEOUT_S) -> StatusView:
        """Take jobs again."""
        return _decode(await self._call("resume", None, timeout), StatusView)

    async def jobs(self, limit: int = 20, *, timeout: float | None = TIMEOUT_S) -> list[JobView]:
        """The most recent jobs, newest first."""
        return _decode(await self._call("jobs", JobsParams(limit=limit), timeout), list[JobView])

    async def logs(
        self, job_id: str, *, follow: bool = False, timeout: float | None = TIMEOUT_S
    ) -> AsyncGenerator[LogChunkView | JobView, None]:
        """The job's log chunks (with ``follow``, until it ends), then the job itself.

        Each piece must come within ``timeout``; with ``follow`` a job may be quiet for
        long, so only the daemon's answer to a ``status`` asked first is timed.
        """
        if follow:
            await self._call("status", None, timeout)
        async with self._busy:
            request_id = await self._send("logs", LogsParams(job_id=job_id, follow=follow))
            ended = False
            try:
                while not ended:
                    frame = await self._timed_frame("logs", None if follow else timeout)
                    if frame.event == "log" and frame.id == request_id:
                        yield _decode(frame.data, LogChunkView)
                    else:
                        ended = True
                        yield _decode(self._result(frame, request_id), JobView)
            finally:
                if not ended:
                    # Left early: the rest of the stream would be taken for the next answer.
                    self._writer.close()

    async def subscribe(self) -> AsyncGenerator[StatusView, None]:
        """The daemon's state now, then each time it changes. Ends by raising
        ``ControlError("connection_lost")`` when the daemon goes away."""
        await self._call("subscribe", None, TIMEOUT_S)
        self._subscribed = True
        while True:
            frame = await self._frame()
            if frame.event != "state":
                raise _error("bad_response", f"expected a state event, got {frame}")
            yield _decode(frame.data, StatusView)

    # ------------------------------------------------------------------ the wire

    async def _call(
        self,
        method: str,
        params: Mapping[str, object] | msgspec.Struct | None,
        timeout: float | None,
    ) -> msgspec.Raw:
        async with self._busy:
            request_id = await self._send(method, params)
            return self._result(await self._timed_frame(method, timeout), request_id)

    async def _timed_frame(self, method: str, timeout: float | None) -> Frame:
        try:
            async with asyncio.timeout(timeout):
                return await self._frame()
        except TimeoutError:
            # A late answer would be taken for the next call's: this connection is done.
            self._writer.close()
            raise _error("timeout", f"{method}: no answer in {timeout} s") from None

    async def _send(self, method: str, params: Mapping[str, object] | msgspec.Struct | None) -> int:
        if self._subscribed:
            raise _error("bad_request", "this connection is subscribed; open another to call")
        request_id = next(self._ids)
        try:
            line = encode_request(request_id, method, params)
        except (UnicodeEncodeError, TypeError) as exc:
            # A lone surrogate (a command-line argument that was not UTF-8), or a value
            # that has no JSON form: nothing is sent.
            raise _error("bad_request", f"{method}: cannot encode the request: {exc}") from None
        try:
            self._writer.write(line)
            await self._writer.drain()
        except ConnectionError as exc:
            raise _error("connection_lost", f"{self.path}: {exc.strerror}") from exc
        return request_id

    def _result(self, frame: Frame, request_id: int) -> msgspec.Raw:
        if frame.error is not None:
            raise _error(frame.error.code, frame.error.message)
        if frame.id != request_id or isinstance(frame.result, msgspec.UnsetType):
            raise _error("bad_response", f"expected the answer to request {request_id}: {frame}")
        return frame.result

    async def _frame(self) -> Frame:
        while not self._lines:
            try:
                data = await self._reader.read(_READ_SIZE)
            except ConnectionError as exc:
                raise _error("connection_lost", f"{self.path}: {exc.strerror}") from exc
            if not data:
                raise _error("connection_lost", f"the agent closed {self.path}")
            self._lines = self._splitter.feed(data)
        line = self._lines.pop(0)
        if line is None:
            raise _error("bad_response", f"an answer longer than {MAX_ANSWER_BYTES} bytes")
        try:
            return self._decoder.decode(line)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _error("bad_response", f"cannot read the agent's answer: {exc}") from None


def _decode(raw: msgspec.Raw | msgspec.UnsetType, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(raw if isinstance(raw, msgspec.Raw) else b"", type=kind)
    except (msgspec.DecodeError, RecursionError) as exc:
        # RecursionError: JSON nested deeper than the decoder goes ([[[[...]]]]).
        raise _error("bad_response", f"cannot read the agent's answer: {exc}") from None


async def watch(
    path: Path | None = None, *, retry_initial_s: float = 0.5, retry_max_s: float = 10.0
) -> AsyncGenerator[StatusView | ControlError, None]:
    """The daemon's states, forever: a ``ControlError`` each time it cannot be reached or
    goes away (with its ``fix``), then a retry with backoff, and states again once back.

    ``path`` None: ``default_socket_path()`` again at each try, so that a service started
    meanwhile is found.
    """
    delay = retry_initial_s
    while True:
        try:
            async with await ControlClient.connect(path or default_socket_path()) as client:
                async for status in client.subscribe():
                    delay = retry_initial_s
                    yield status
        except ControlError as exc:
            yield exc
        await asyncio.sleep(delay)
        delay = min(retry_max_s, delay * 2)


def call_sync(
    path: Path,
    method: str,
    params: Mapping[str, object] | msgspec.Struct | None = None,
    *,
    timeout: float | None = TIMEOUT_S,
) -> Any:
    """``ControlClient.call`` for code without an event loop (one connection per call)."""

    async def call() -> Any:
        async with await ControlClient.connect(path) as client:
            return await client.call(method, params, timeout=timeout)

    return asyncio.run(call())
