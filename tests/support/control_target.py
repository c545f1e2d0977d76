"""A daemon in memory for the control API's tests: the ``ControlTarget`` side, no jobs run."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from agent.control.wire import GpuView, JobView, LogChunkView, StatusView
from agent.errors import ControlError
from agent.owner.policy import OwnerPolicy, changed

__all__ = ["MemoryTarget", "as_user", "connect_as", "job", "short_dir", "status"]


def status(**changes: object) -> StatusView:
    """A daemon with two GPUs, one of them busy."""
    base = StatusView(
        agent_version="0.9.0",
        node_id="node-7f3a",
        connection="connected",
        coordinator_url="wss://coordinator.example/agent",
        gpus=[
            GpuView(
                index=0,
                uuid="GPU-aaaa",
                name="NVIDIA GeForce RTX 4090",
                vendor="nvidia",
                health="healthy",
                assigned_job="job-2",
                temperature_c=61.0,
                utilization_pct=97.0,
            ),
            GpuView(
                index=1,
                uuid="GPU-bbbb",
                name="NVIDIA GeForce RTX 4090",
                vendor="nvidia",
                health="unhealthy",
                health_reason="xid 79: fallen off the bus",
            ),
        ],
        jobs=[job("job-2", "running")],
        outbox_depth=3,
        jobs_done_today=5,
    )
    return msgspec.structs.replace(base, **changes)


def job(job_id: str, state: str, **changes: object) -> JobView:
    """A job on the first GPU."""
    base = JobView(
        job_id=job_id, state=state, gpus=["GPU-aaaa"], created_at=1.7e9, updated_at=1.7e9 + 60
    )
    return msgspec.structs.replace(base, **changes)


class MemoryTarget:
    """Holds a status, a job list and their logs; the test drives them."""

    def __init__(self) -> None:
        self.owner = OwnerPolicy()
        self.state = status()
        self.history = [job("job-2", "running"), job("job-1", "completed", exit_code=0)]
        self.chunks: dict[str, list[LogChunkView]] = {"job-1": [], "job-2": []}
        self.ended: set[str] = {"job-1"}
        self.drain_started = asyncio.Event()
        self.drained = asyncio.Event()
        self.fail_status = False
        self.following = asyncio.Event()
        """Set when a ``logs`` follower has sent all there is and waits for more."""
        self._changed = asyncio.Event()

    def status(self) -> StatusView:
        if self.fail_status:
            raise RuntimeError("the daemon's bug")
        return self.state

    async def pause(self, drain: bool, until: float | None = None) -> StatusView:
        self.state = msgspec.structs.replace(
            self.state,
            paused=True,
            pause_reason="by the owner",
            draining=drain,
            paused_until=until,
        )
        if drain:
            self.drain_started.set()
            await self.drained.wait()
            self.state = msgspec.structs.replace(self.state, draining=False, jobs=[])
        return self.state

    async def resume(self) -> StatusView:
        self.state = msgspec.structs.replace(
            self.state, paused=False, pause_reason="", paused_until=None
        )
        return self.state

    def settings(self) -> OwnerPolicy:
        return self.owner

    async def set_settings(self, changes: dict[str, Any]) -> OwnerPolicy:
        try:
            self.owner = changed(self.owner, changes)
        except ValueError as exc:
            raise ControlError("bad_settings", str(exc)) from None
        return self.owner

    def jobs(self, limit: int) -> list[JobView]:
        return self.history[:limit]

    def job(self, job_id: str) -> JobView:
        for view in self.history:
            if view.job_id == job_id:
                return view
        raise ControlError("unknown_job", f"no job {job_id!r}")

    async def logs(self, job_id: str, follow: bool) -> AsyncIterator[LogChunkView]:
        self.job(job_id)
        sent = 0
        while True:
            changed = self._changed
            pending = self.chunks[job_id][sent:]
            for chunk in pending:
                yield chunk
                sent += 1
            if pending:
                continue
            if not follow or job_id in self.ended:
                return
            self.following.set()
            await changed.wait()

    def log(self, job_id: str, stream: str, data: str) -> None:
        """The job wrote something."""
        self.chunks[job_id].append(LogChunkView(stream=stream, data=data))  # type: ignore[arg-type]
        self._wake()

    def end(self, job_id: str, exit_code: int) -> None:
        """The job ended."""
        self.ended.add(job_id)
        self.history = [
            msgspec.structs.replace(v, state="completed", exit_code=exit_code)
            if v.job_id == job_id
            else v
            for v in self.history
        ]
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


@contextmanager
def short_dir() -> Iterator[Path]:
    """A fresh directory with a path short enough for unix sockets (pytest's can exceed
    the 107 bytes a socket path may have)."""
    path = Path(tempfile.mkdtemp(prefix="gpa-"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@contextmanager
def as_user(uid: int, gid: int, groups: list[int]) -> Iterator[None]:
    """Take another effective uid, gid and groups for a moment (root only): what the
    kernel records for a connection made meanwhile."""
    saved = os.getgroups()
    os.setgroups(groups)
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(saved)


def connect_as(path: Path, uid: int, gid: int, groups: list[int]) -> socket.socket:
    """A connection to ``path`` made as another user; the listener accepts it later."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with as_user(uid, gid, groups):
            sock.connect(os.fsencode(path))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
