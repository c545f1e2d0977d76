"""Run functions in forked children with a time limit.

Vendor libraries hang (a wedged driver blocks ``nvmlInit`` for minutes) and crash (a
library from another driver branch segfaults). Discovery therefore runs in child
processes, one per backend and all at once: a hang becomes a ``timeout``, a crash becomes
``crashed``, and the caller and the other backends live on.
"""

from __future__ import annotations

import faulthandler
import os
import selectors
import signal
import sys
import time
from collections.abc import Callable, Sequence

from hal.errors import DiscoveryFailed

__all__ = ["Isolated"]

_CHUNK = 1 << 16
_KILL_GRACE_POLLS = 20
_KILL_GRACE_POLL_S = 0.005
_EX_SOFTWARE = 70


class Isolated:
    """Functions running in forked children, one each, all started at once.

    Start them, do other work meanwhile, then collect with :meth:`results` (or give them up
    with :meth:`close`).
    """

    def __init__(self, fns: Sequence[Callable[[], bytes]], timeout_s: float) -> None:
        # Flush so that buffered output is not written twice, once by each process.
        sys.stdout.flush()
        sys.stderr.flush()
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._children = [_spawn(fn) for fn in fns]

    def results(self) -> list[bytes | DiscoveryFailed]:
        """What each function returned, in order; blocks until all are done or time is up.

        A child that does not finish in time is killed and its slot holds
        ``DiscoveryFailed("timeout")``; one that dies holds ``DiscoveryFailed("crashed")``.
        """
        _sweep()
        buffers: dict[int, list[bytes]] = {fd: [] for _, fd in self._children}
        open_fds = set(buffers)
        with selectors.DefaultSelector() as selector:  # epoll/poll: no FD_SETSIZE limit
            for fd in open_fds:
                selector.register(fd, selectors.EVENT_READ)
            while open_fds:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in selector.select(remaining):
                    fd = int(key.fd)
                    chunk = os.read(fd, _CHUNK)
                    if chunk:
                        buffers[fd].append(chunk)
                    else:
                        selector.unregister(fd)
                        open_fds.discard(fd)
        results: list[bytes | DiscoveryFailed] = []
        while self._children:
            pid, fd = self._children.pop(0)
            os.close(fd)
            if fd in open_fds:
                os.kill(pid, signal.SIGKILL)
                _reap_later(pid)
                results.append(
                    DiscoveryFailed("timeout", f"no answer within {self._timeout_s:g} s")
                )
                continue
            _, status = os.waitpid(pid, 0)
            failure = _failure(status)
            results.append(failure if failure is not None else b"".join(buffers[fd]))
        return results

    def close(self) -> None:
        """Kill the children whose results were not collected, for a caller that gave up."""
        for pid, fd in self._children:
            os.close(fd)
            os.kill(pid, signal.SIGKILL)  # a child that already exited is a zombie: still ours
            _reap_later(pid)
        self._children = []


# Children killed after a timeout that have not died yet: one stuck in the kernel inside a
# wedged driver (uninterruptible sleep) dies only when that call returns, perhaps never.
# Waiting for it would hang the caller the time limit exists to protect.
_unreaped: set[int] = set()


def _reap_later(pid: int) -> None:
    """Reap a killed child within a short grace, else remember it for a later sweep."""
    _unreaped.add(pid)
    for _ in range(_KILL_GRACE_POLLS):
        _sweep()
        if pid not in _unreaped:
            return
        time.sleep(_KILL_GRACE_POLL_S)


def _sweep() -> None:
    """Reap every remembered child that has died by now, without waiting for any."""
    for child in list(_unreaped):
        try:
            done, _ = os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            done = child
        if done:
            _unreaped.discard(child)


def _spawn(fn: Callable[[], bytes]) -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        # A crash is reported by its signal; a faulthandler dump inherited from the
        # parent would only add noise to the caller's stderr.
        faulthandler.disable()
        status = 0
        try:
            _write_all(write_fd, fn())
        except BaseException:  # the child must never return into the caller's code
            status = _EX_SOFTWARE
            import traceback  # only now: it pulls in linecache and tokenize

            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(write_fd)
    return pid, read_fd


def _failure(status: int) -> DiscoveryFailed | None:
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return DiscoveryFailed("crashed", f"discovery process killed by {name}")
    if os.WEXITSTATUS(status) != 0:
        return DiscoveryFailed("crashed", f"discovery process exited with {os.WEXITSTATUS(status)}")
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
