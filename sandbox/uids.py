"""The uids jobs run as, one of its own per live job.

The kernel counts some limits per uid (inotify instances and watches, user namespaces,
message queues...): jobs sharing one uid share them, and the first job can take them
all. Each live job gets a uid (and the gid of the same number) of its own instead.

Two runners on one host (the daemon, and a ``gpu-agent run-local`` beside it) take from
the same range, so a uid is held by an exclusive ``flock`` on a file named after it in a
host-wide directory: the kernel releases it when its holder exits, however it exits.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from sandbox.errors import RunError

__all__ = ["DEFAULT_LOCK_DIR", "FILE_CAPABILITIES", "UidPool", "can_give_files_away"]

DEFAULT_LOCK_DIR = Path("/run/lock/gpu-agent-job-uids")

#: What giving each job a uid of its own takes: handing the job its output directory
#: (CAP_CHOWN), and reading, measuring and removing whatever the job left there, whatever
#: modes it set (CAP_DAC_OVERRIDE, CAP_FOWNER). Root has them; the service is given them.
FILE_CAPABILITIES = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3}


def can_give_files_away(status: Path = Path("/proc/self/status")) -> bool:
    """Whether this process holds every one of :data:`FILE_CAPABILITIES` now."""
    try:
        lines = status.read_text(encoding="ascii").splitlines()
    except OSError:
        return os.geteuid() == 0
    effective = next((int(line.split()[1], 16) for line in lines if line.startswith("CapEff:")), 0)
    return all(effective >> bit & 1 for bit in FILE_CAPABILITIES.values())


class UidPool:
    """``count`` uids from ``base`` on, each held by at most one live job on this host."""

    def __init__(self, base: int, count: int, lock_dir: Path = DEFAULT_LOCK_DIR) -> None:
        self.base = base
        self.count = count
        self.lock_dir = lock_dir
        self._held: dict[int, int] = {}  # uid -> the descriptor holding its lock

    def take(self) -> int:
        """The lowest uid no live job holds; RunError ``no_free_uid`` when all are held."""
        try:
            self.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory = os.open(self.lock_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            raise RunError(
                "no_free_uid", f"cannot lock job uids in {self.lock_dir}: {exc}"
            ) from exc
        try:
            for uid in range(self.base, self.base + self.count):
                if uid not in self._held and (fd := _lock(directory, uid)) is not None:
                    self._held[uid] = fd
                    return uid
        finally:
            os.close(directory)
        raise RunError("no_free_uid", f"all {self.count} job uids are in use")

    def release(self, uid: int) -> None:
        """Give ``uid`` back: nothing runs as it any more."""
        fd = self._held.pop(uid, None)
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the lock


def _lock(directory: int, uid: int) -> int | None:
    """A descriptor holding ``uid``'s lock, or None while another holds it."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(str(uid), flags, 0o600, dir_fd=directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
