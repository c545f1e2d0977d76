"""The uids jobs run as, one of its own per live job.

The kernel counts some limits per uid (inotify instances and watches, user namespaces,
message queues...): jobs sharing one uid share them, and the first job can take them
all. Each live job gets a uid (and the gid of the same number) of its own instead.
"""

from __future__ import annotations

from sandbox.errors import RunError

__all__ = ["UidPool"]


class UidPool:
    """``count`` uids from ``base`` on, each held by at most one live job."""

    def __init__(self, base: int, count: int) -> None:
        self.base = base
        self.count = count
        self._taken: set[int] = set()

    def take(self) -> int:
        """The lowest uid no live job holds; RunError ``no_free_uid`` when all are held."""
        for uid in range(self.base, self.base + self.count):
            if uid not in self._taken:
                self._taken.add(uid)
                return uid
        raise RunError("no_free_uid", f"all {self.count} job uids are in use")

    def release(self, uid: int) -> None:
        """Give ``uid`` back: nothing runs as it any more."""
        self._taken.discard(uid)
