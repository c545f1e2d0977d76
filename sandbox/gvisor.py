"""Finding gVisor sandboxes that outlived their container, and ending them.

A ``runsc`` sandbox is a pair of host processes, ``runsc-sandbox`` (whose last argument
is the container id) and ``runsc-gofer``; both name the container id in their arguments.
When the runtime shim dies with the engine or the agent, they can stay behind, holding
memory, with no container left for Docker to remove.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Collection
from pathlib import Path

__all__ = ["leaked_sandboxes", "reap_sandboxes"]

_SANDBOX = "runsc-sandbox"
_RUNSC_PROCESSES = (_SANDBOX, "runsc-gofer")
_CONTAINER_ID_LENGTH = 64
_log = logging.getLogger(__name__)


def _cmdlines(proc: Path) -> dict[int, list[str]]:
    """The argument vectors of the runsc processes on this host."""
    found = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # it exited while we looked
            continue
        if argv and Path(argv[0]).name in _RUNSC_PROCESSES:
            found[int(entry.name)] = [arg for arg in argv if arg]
    return found


def leaked_sandboxes(known: Collection[str], proc: Path = Path("/proc")) -> dict[str, list[int]]:
    """Sandboxes whose container id is not in ``known``: id -> the pids that serve it."""
    processes = _cmdlines(proc)
    sandbox_ids = {
        argv[-1]
        for argv in processes.values()
        if Path(argv[0]).name == _SANDBOX and len(argv[-1]) == _CONTAINER_ID_LENGTH
    }
    leaked = sandbox_ids - set(known)
    return {
        container_id: sorted(
            pid for pid, argv in processes.items() if any(container_id in arg for arg in argv)
        )
        for container_id in sorted(leaked)
    }


def reap_sandboxes(known: Collection[str], proc: Path = Path("/proc")) -> list[str]:
    """SIGKILL every leaked sandbox's processes; return the container ids reaped."""
    leaked = leaked_sandboxes(known, proc)
    for container_id, pids in leaked.items():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # already gone
            except PermissionError:
                # The sandbox runs as root and this agent does not: say so, go on.
                _log.warning("cannot end leaked gVisor sandbox %s (pid %d)", container_id, pid)
    return list(leaked)
