"""Daemons for the tray's tests, each on an asyncio loop in a thread of its own: Qt has the
test's main thread, and ``qtbot.waitUntil`` spins Qt's loop, not asyncio's.

- :class:`ServedTarget`: the real ``ControlServer`` over ``MemoryTarget`` (that publishes
  its state after each change, as the daemon does).
- :class:`CoordinatorThread`: the reference coordinator, for a real ``gpu-agent run``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from agent.control.server import ControlServer
from agent.control.wire import StatusView
from agent.owner.policy import OwnerPolicy
from coordinator.server import Coordinator
from support.control_target import MemoryTarget

__all__ = ["CoordinatorThread", "LoopThread", "PublishingTarget", "ServedTarget"]

T = TypeVar("T")


class LoopThread:
    """An asyncio loop running in a thread; :meth:`call` runs a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Awaitable[T], timeout: float = 60) -> T:
        """Run ``coro`` on the loop and wait for its result."""

        async def run() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def do(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop's thread (what the daemon's objects expect)."""

        async def run() -> T:
            return fn()

        return self.call(run())

    def close(self) -> None:
        """Let what is under way end, then stop the loop and its thread."""
        self.call(_drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


async def _drain() -> None:
    # A connection accepted as a server closed is handed to the server's handler a few
    # turns of the loop later (which drops it); only what is left then is cancelled.
    for _ in range(10):
        await asyncio.sleep(0)
    left = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in left:
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)


class PublishingTarget(MemoryTarget):
    """A ``MemoryTarget`` that tells the subscribers after each change, as the daemon does."""

    server: ControlServer | None = None

    def change(self, **changes: Any) -> None:
        """The daemon's state changed."""
        self.state = msgspec.structs.replace(self.state, **changes)
        self.publish()

    def publish(self) -> None:
        """Send the state to the subscribers."""
        if self.server is not None:
            self.server.publish(self.state)

    async def pause(self, drain: bool, until: float | None = None) -> StatusView:
        status = await super().pause(drain, until)
        self.publish()
        return status

    async def resume(self) -> StatusView:
        status = await super().resume()
        self.publish()
        return status

    async def set_settings(self, changes: dict[str, Any]) -> OwnerPolicy:
        policy = await super().set_settings(changes)
        self.publish()
        return policy


class ServedTarget(LoopThread):
    """``PublishingTarget`` behind a real control server on ``path``."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.target = self.do(PublishingTarget)
        self.server: ControlServer | None = None

    def start(self) -> None:
        """Start answering on the socket."""
        server = ControlServer(self.target, self.path)
        self.call(server.start())
        self.server = self.target.server = server

    def stop(self) -> None:
        """Stop answering and remove the socket: the daemon went away."""
        if self.server is not None:
            self.call(self.server.close())
            self.server = self.target.server = None

    def change(self, **changes: Any) -> None:
        """Change the daemon's state; the subscribers hear of it."""
        self.do(lambda: self.target.change(**changes))

    def close(self) -> None:
        self.stop()
        super().close()


class CoordinatorThread(LoopThread):
    """The reference coordinator on 127.0.0.1, serving from its own thread."""

    def __init__(self, workdir: Path, port: int) -> None:
        super().__init__()
        self.coordinator = Coordinator(
            db_path=workdir / "coordinator.db", state_dir=workdir / "coordinator", port=port
        )
        self.call(self.coordinator.start())

    def submit(self, node_id: str, spec: dict[str, Any]) -> str:
        """Offer a job to the node; its id."""
        return self.call(self.coordinator.submit(node_id, spec))

    def job_state(self, job_id: str) -> str:
        """The job's state as the coordinator knows it."""
        row = self.do(lambda: self.coordinator.store.jobs.get(job_id))
        return row.state if row is not None else ""

    def close(self) -> None:
        self.call(self.coordinator.stop())
        super().close()
