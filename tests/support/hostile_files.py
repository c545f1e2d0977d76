"""What the unit and the integration test_hostile_files.py share."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["as_nobody", "nest"]


def nest(root: Path, depth: int, name: str = "d") -> int:
    """Make ``depth`` nested directories under ``root`` as a job would; the deepest, open."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        deeper = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = deeper
    return fd


def as_nobody(directory: Path, check: Callable[[], bool]) -> bool:
    """``check()`` in a child running as uid 65534 in ``directory``: an agent not root."""
    pid = os.fork()
    if pid == 0:
        status = 2
        try:
            os.chdir(directory)
            os.setgid(65534)
            os.setuid(65534)
            status = 0 if check() else 1
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
