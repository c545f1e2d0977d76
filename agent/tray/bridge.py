"""The tray's link to the daemon: the control client on an asyncio loop in a thread of its own.

Qt owns the main thread and the control client is asyncio. Rather than run one loop inside
the other, a worker thread runs an asyncio loop that

- follows the state stream with :func:`agent.control.client.watch` (which re-subscribes
  with backoff after a drop, and yields a ``ControlError`` with its fix meanwhile), and
- runs the calls that the menu and the windows ask for (:meth:`Bridge.request`), each on
  a connection of its own: a subscribed connection takes no calls.

Results cross back through signals of an object that lives in the main thread, so they
are queued there: every callback and every ``state`` slot runs in Qt's thread. The worker
never holds a Qt object, not even in a callback's closure: it gets a number for each call
and the callbacks stay here. A Qt object whose last reference went in the worker would be
destroyed there, and ``QObject``'s destructor, taking Qt's locks and then the GIL, can
deadlock against Qt's thread doing the same the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from PySide6.QtCore import QObject, Signal

from agent.control.client import ControlClient, default_socket_path, watch
from agent.control.wire import StatusView
from agent.errors import ControlError

__all__ = ["Bridge"]

T = TypeVar("T")


class Bridge(QObject):
    """The daemon, as seen from Qt's thread.

    Args:
        path: the control socket; None: :func:`default_socket_path` at each try, so that a
            service started meanwhile is found.
        retry_initial_s: the first wait before reconnecting after a drop...
        retry_max_s: ...doubling up to this.
    """

    state = Signal(object)
    """Each ``StatusView`` of the stream, or the ``ControlError`` that says why none came."""

    _seen = Signal(object)
    _answered = Signal(int, object)

    def __init__(
        self,
        path: Path | None = None,
        *,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 10.0,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.path = path
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._loop = asyncio.new_event_loop()
        self._halt = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-agent-tray-io", daemon=True)
        self._running = False
        self._calls = itertools.count()
        self._waiting: dict[int, Callable[[Any], Any]] = {}
        # Emitted from the worker, received here: queued into Qt's thread.
        self._seen.connect(self._relay)
        self._answered.connect(self._deliver)

    def start(self) -> None:
        """Start following the daemon."""
        if not self._running and not self._loop.is_closed():
            self._running = True
            self._thread.start()

    def stop(self) -> None:
        """Stop: close the connections, end the thread. Calls still under way are dropped."""
        if self._running:
            self._running = False
            self._loop.call_soon_threadsafe(self._halt.set)
            self._thread.join()
            self._waiting.clear()

    def request(
        self,
        call: Callable[[ControlClient], Awaitable[T]],
        then: Callable[[T | ControlError], Any],
    ) -> None:
        """Run ``call`` on a new connection; ``then`` gets its result, or the
        ``ControlError`` it raised, in Qt's thread. Ignored once stopped.

        ``call`` runs in the worker thread: it must not refer to any Qt object.
        """
        if self._running:
            number = next(self._calls)
            self._waiting[number] = then
            asyncio.run_coroutine_threadsafe(self._request(number, call), self._loop)

    def socket_path(self) -> Path:
        """The socket the next connection goes to."""
        return self.path or default_socket_path()

    # ------------------------------------------------------------------ Qt's thread

    def _relay(self, state: StatusView | ControlError) -> None:
        self.state.emit(state)

    def _deliver(self, number: int, result: object) -> None:
        then = self._waiting.pop(number, None)
        if then is not None:  # None: stopped meanwhile
            then(result)

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _main(self) -> None:
        follower = asyncio.create_task(self._follow())
        await self._halt.wait()
        follower.cancel()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(follower, *others, return_exceptions=True)

    async def _follow(self) -> None:
        states = watch(
            self.path, retry_initial_s=self.retry_initial_s, retry_max_s=self.retry_max_s
        )
        async with contextlib.aclosing(states):
            async for state in states:
                self._seen.emit(state)

    async def _request(self, number: int, call: Callable[[ControlClient], Awaitable[T]]) -> None:
        result: T | ControlError
        try:
            async with await ControlClient.connect(self.socket_path()) as client:
                result = await call(client)
        except ControlError as exc:
            result = exc
        self._answered.emit(number, result)
