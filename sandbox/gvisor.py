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

__all__ = ["reap_sandboxes", "sandboxes_of"]

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


def sandboxes_of(
    container_ids: Collection[str], proc: Path = Path("/proc")
) -> dict[str, list[int]]:
    """The runsc processes serving each of ``container_ids`` that still has a sandbox."""
    processes = _cmdlines(proc)
    sandbox_ids = {
        argv[-1]
        for argv in processes.values()
        if Path(argv[0]).name == _SANDBOX and len(argv[-1]) == _CONTAINER_ID_LENGTH
    }
    return {
        container_id: sorted(
            pid for pid, argv in processes.items() if any(container_id in arg for arg in argv)
        )
        for container_id in sorted(sandbox_ids & set(container_ids))
    }


def reap_sandboxes(container_ids: Collection[str], proc: Path = Path("/proc")) -> list[str]:
    """SIGKILL the sandboxes of these (our own, orphaned) containers; return the ids reaped.

    Only ids the caller knows to be its own: another engine's or another runner's gVisor
    sandboxes are none of our business.
    """
    leaked = sandboxes_of(container_ids, proc)
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
