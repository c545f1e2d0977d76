"""Finding gVisor sandboxes that outlived their container, and ending them.

A ``runsc`` sandbox is a pair of host processes, ``runsc-sandbox`` (whose last argument
is the container id) and ``runsc-gofer``; both name the container id in their arguments.
When the runtime shim dies with the engine or the agent, they can stay behind, holding
memory, with no container left for Docker to remove.

The other way round, a runsc container whose start failed (after its create) leaves its
``containerd-shim-runc-v2`` running when Docker removes the container: a process per
failed job, waiting on a sandbox that is gone. Killed, containerd cleans up after it.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
from collections.abc import Collection
from pathlib import Path

__all__ = ["reap_sandboxes", "reap_shims", "sandboxes_of", "shims_of"]

_SANDBOX = "runsc-sandbox"
_RUNSC_PROCESSES = (_SANDBOX, "runsc-gofer")
_SHIM = "containerd-shim-runc-v2"
_CONTAINER_ID_LENGTH = 64
_log = logging.getLogger(__name__)


def _cmdlines(proc: Path, names: Collection[str] = _RUNSC_PROCESSES) -> dict[int, list[str]]:
    """The argument vectors of the processes called one of ``names`` on this host."""
    found = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # it exited while we looked
            continue
        if argv and Path(argv[0]).name in names:
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
    return _kill(sandboxes_of(container_ids, proc), "gVisor sandbox")


def shims_of(container_ids: Collection[str], proc: Path = Path("/proc")) -> dict[str, list[int]]:
    """The containerd shims (``containerd-shim-runc-v2 ... -id <container id>``) serving
    each of ``container_ids`` that still has one."""
    wanted = set(container_ids)
    found: dict[str, list[int]] = {}
    for pid, argv in _cmdlines(proc, (_SHIM,)).items():
        served = {value for flag, value in itertools.pairwise(argv) if flag == "-id"}
        for container_id in sorted(served & wanted):
            found.setdefault(container_id, []).append(pid)
    return found


def reap_shims(container_ids: Collection[str], proc: Path = Path("/proc")) -> list[str]:
    """SIGKILL the shims left serving these containers, which must be removed already (and
    ours); return the ids whose shim was reaped."""
    return _kill(shims_of(container_ids, proc), "containerd shim")


def _kill(leaked: dict[str, list[int]], what: str) -> list[str]:
    for container_id, pids in leaked.items():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # already gone
            except PermissionError:
                # It runs as root and this agent does not: say so, go on.
                _log.warning("cannot end leaked %s of %s (pid %d)", what, container_id, pid)
    return list(leaked)
