"""The processes holding a DRM client of each AMD or Intel GPU, from ``/proc``.

Every open DRM file (``/dev/dri/card*``, ``renderD*``) is one client, and the kernel prints
its usage stats in the fdinfo of each descriptor that refers to it
(``Documentation/gpu/drm-usage-stats.rst``): ``drm-driver``, ``drm-pdev`` (the GPU's PCI
address), ``drm-client-id`` (one per ``struct drm_file``, so a descriptor that was
duplicated, inherited or passed shows the same id), engine busy times and memory per
region. amdgpu prints them since Linux 5.14, i915 since 5.19, xe from its start.

Rules this module chooses, and why:

- One :class:`~hal.types.GpuProcess` per process and GPU. A client held by several
  processes counts once, for the lowest pid holding it (usually the parent).
- ``used_memory_bytes`` is the client's device-local memory (regions ``vram*`` of amdgpu and
  xe, ``local*`` of i915): ``drm-total-`` (what it allocated, as NVML's ``usedGpuMemory``),
  else ``drm-resident-`` or amdgpu's older ``drm-memory-`` (resident: the closest reading
  there is). A GPU without local memory has no such region: unsupported.
- ``kind`` is ``graphics`` for a process whose client has used the graphics engine
  (``gfx`` on amdgpu, ``render`` on i915, ``rcs`` on xe) and ``compute`` otherwise: DRM has
  no context type as NVML has, and a ROCm process works through KFD queues and the
  compute engines, never the graphics ring.
- The agent's own process is left out: it is not a user of the GPU.

What it can see: a process's descriptors are readable only with ptrace rights over it
(Linux 5.18+ checks them on fdinfo too), so an agent that is neither root nor the same user
sees its own user's processes only, and a systemd service with ``ProtectProc=invisible``
sees no other user's process at all. Processes whose descriptors could not be read are
counted in :attr:`DrmClients.hidden` and logged once.

Cost: reading every descriptor of every process is too slow for each tick (48 ms of CPU
for 590 processes, 500 of them with 40 open files), so a process's descriptors are read when
it is first seen, when its number of open files changes (``st_size`` of ``/proc/<pid>/fd``,
Linux 6.2+), every tick for the first seconds of a new process's life, and every
``rescan_s`` otherwise, staggered; each tick re-reads only the fdinfo of the DRM descriptors
already known. A steady tick then costs about 2 ms for those 590 processes, 1.3 ms of it the
``stat`` of each one (``bench/drm_clients.py``).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections.abc import Collection
from pathlib import Path
from typing import NamedTuple

from hal.types import UNSUPPORTED, GpuProcess, Reading, Unavailable

__all__ = ["DrmClient", "DrmClientScan", "DrmClients", "parse_fdinfo", "scanner_for"]

_log = logging.getLogger(__name__)

_DRM_PREFIX = "/dev/dri/"
_YOUNG_S = 10.0
"""A process this young has its descriptors read every tick: it is likely still opening them."""
_STAGGER = 61
"""The first rescans of the processes already running are spread over this many slots."""
_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_LOCAL_MEMORY = re.compile(r"drm-(total|resident|memory)-((?:vram|local)\d*)")
_GRAPHICS_ENGINES = ("drm-engine-gfx", "drm-engine-render", "drm-cycles-rcs")


class DrmClient(NamedTuple):
    """One DRM client as its fdinfo describes it."""

    driver: str
    pdev: str | None
    """The GPU's PCI address, lower case; None for a device that is not on PCI."""
    client_id: str | None
    local_memory_bytes: int | None
    """Device-local memory (rules in the module doc); None when the client reports none."""
    graphics: bool
    """Whether it has used the graphics engine."""


class DrmClients(NamedTuple):
    """What one scan of ``/proc`` found."""

    by_device: dict[str, list[GpuProcess]]
    """PCI address -> the processes holding a client of that GPU, by pid."""
    drivers: frozenset[str]
    """The drivers that named themselves in some client's fdinfo."""
    silent: int
    """DRM descriptors whose fdinfo names no driver: a kernel that prints no client stats."""
    hidden: int
    """Processes whose descriptors could not be read."""
    failure: Unavailable | None = None
    """Why ``/proc`` itself could not be read, if it could not."""

    def processes(
        self, pci_bus_id: str | None, drivers: Collection[str]
    ) -> Reading[list[GpuProcess]]:
        """The processes on the GPU at ``pci_bus_id``; ``drivers`` are its backend's.

        Unavailable when some DRM files name no driver and none names one of ``drivers``:
        a kernel that prints no client stats, where an empty list would be a guess.
        """
        if self.failure is not None:
            return self.failure
        if pci_bus_id is None:
            return UNSUPPORTED
        if self.silent and not self.drivers.intersection(drivers):
            return Unavailable(
                "no_client_stats",
                "DRM fdinfo names no driver: Linux 5.14+ (amdgpu) or 5.19+ (i915) shows clients",
            )
        return self.by_device.get(pci_bus_id.lower(), [])


class _Proc:
    """What is known of one process between scans."""

    __slots__ = ("drm_fds", "fd_count", "first_seen", "hidden", "next_scan")

    def __init__(self, first_seen: float) -> None:
        self.first_seen = first_seen
        self.fd_count = -1
        self.next_scan = 0.0
        self.drm_fds: list[str] = []
        self.hidden = False


class DrmClientScan:
    """Finds the DRM clients of every process under ``proc_root``, keeping what it can."""

    def __init__(self, proc_root: Path, *, rescan_s: float = 60.0) -> None:
        self.proc_root = proc_root
        self.rescan_s = rescan_s
        self._procs: dict[str, _Proc] = {}
        self._first = True
        self._lock = threading.Lock()
        self._last: tuple[float, DrmClients] | None = None
        self._told_hidden = False

    def clients(self, now: float) -> DrmClients:
        """The clients now; ``now`` is monotonic, and a second call with the same ``now``
        (another backend in the same tick) gets the same answer without a second scan."""
        with self._lock:
            if self._last is not None and self._last[0] == now:
                return self._last[1]
            found = self._scan(now)
            self._last = (now, found)
            return found

    def _scan(self, now: float) -> DrmClients:
        root = str(self.proc_root)
        try:
            pids = sorted((e.name for e in os.scandir(root) if e.name.isdigit()), key=int)
        except OSError as exc:
            failure = Unavailable("proc_unreadable", f"{root}: {exc.strerror}")
            return DrmClients({}, frozenset(), 0, 0, failure)
        for gone in self._procs.keys() - set(pids):
            del self._procs[gone]
        me = str(os.getpid())
        seen: set[tuple[str, str]] = set()
        memory: dict[tuple[str, str], int | None] = {}
        graphics: dict[tuple[str, str], bool] = {}
        drivers: set[str] = set()
        silent = 0
        for pid in pids:
            if pid == me:
                continue
            proc = self._refresh(root, pid, now)
            if proc is None:
                continue
            for fd in list(proc.drm_fds):
                client = _read_client(f"{root}/{pid}/fdinfo/{fd}")
                if client is None:  # closed, or the number now holds another file
                    proc.drm_fds.remove(fd)
                    continue
                if not client.driver:
                    silent += 1
                    continue
                drivers.add(client.driver)
                if client.pdev is None:
                    continue
                identity = (client.pdev, client.client_id or f"{pid}/{fd}")
                if identity in seen:
                    continue
                seen.add(identity)
                key = (client.pdev, pid)
                graphics[key] = graphics.get(key, False) or client.graphics
                amount = client.local_memory_bytes
                if key not in memory:
                    memory[key] = amount
                elif amount is not None:
                    memory[key] = (memory[key] or 0) + amount
        self._first = False
        by_device: dict[str, list[GpuProcess]] = {}
        for (pdev, pid), used in memory.items():
            by_device.setdefault(pdev, []).append(
                GpuProcess(
                    pid=int(pid),
                    used_memory_bytes=UNSUPPORTED if used is None else used,
                    kind="graphics" if graphics[pdev, pid] else "compute",
                )
            )
        hidden = sum(1 for proc in self._procs.values() if proc.hidden)
        if hidden and not self._told_hidden:
            self._told_hidden = True
            _log.info(
                "the descriptors of %d process(es) under %s cannot be read: their GPU use is "
                "not seen (that needs root or the same user)",
                hidden,
                root,
            )
        return DrmClients(by_device, frozenset(drivers), silent, hidden)

    def _refresh(self, root: str, pid: str, now: float) -> _Proc | None:
        """The process, its DRM descriptors read again when due; None once it has exited."""
        fd_dir = f"{root}/{pid}/fd"
        try:
            fd_count = os.stat(fd_dir).st_size  # the number of open files on Linux 6.2+
        except PermissionError:
            fd_count = -1  # another user's: listing it will say so
        except OSError:
            self._procs.pop(pid, None)
            return None
        proc = self._procs.get(pid)
        if proc is None:
            # Processes running before the first scan are not young; their rescans are staggered.
            proc = _Proc(first_seen=float("-inf") if self._first else now)
            proc.next_scan = now + self.rescan_s * (int(pid) % _STAGGER + 1) / _STAGGER
            self._procs[pid] = proc
            due = True
        else:
            due = (
                now >= proc.next_scan
                or now - proc.first_seen < _YOUNG_S
                or (fd_count != proc.fd_count and not proc.hidden)
            )
            if now >= proc.next_scan:
                proc.next_scan = now + self.rescan_s
        proc.fd_count = fd_count
        if due:
            try:
                proc.drm_fds = _drm_fds(fd_dir)
                proc.hidden = False
            except PermissionError:
                proc.drm_fds, proc.hidden = [], True
            except OSError:
                self._procs.pop(pid, None)
                return None
        return proc


@functools.cache
def scanner_for(proc_root: Path) -> DrmClientScan:
    """The one scanner of ``proc_root``, shared by the backends so that a tick scans once."""
    return DrmClientScan(proc_root)


def parse_fdinfo(text: str) -> DrmClient | None:
    """The DRM client an fdinfo file describes; None when it is not a DRM file's.

    A DRM file's fdinfo without ``drm-driver`` (a kernel that prints no client stats) gives
    a client whose ``driver`` is empty.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("drm-"):
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    if "drm-driver" not in fields:
        return DrmClient("", None, None, None, graphics=False)
    pdev = fields.get("drm-pdev")
    return DrmClient(
        driver=fields["drm-driver"],
        pdev=pdev.lower() if pdev else None,
        client_id=fields.get("drm-client-id"),
        local_memory_bytes=_local_memory(fields),
        graphics=any((_number(fields.get(key, "")) or 0) > 0 for key in _GRAPHICS_ENGINES),
    )


def _drm_fds(fd_dir: str) -> list[str]:
    """The descriptors of a process that refer to DRM device files."""
    found = []
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith(_DRM_PREFIX):
            found.append(fd)
    return found


def _read_client(path: str) -> DrmClient | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return parse_fdinfo(file.read())
    except OSError:
        return None


def _local_memory(fields: dict[str, str]) -> int | None:
    by_kind: dict[str, int] = {}
    for key, value in fields.items():
        match = _LOCAL_MEMORY.fullmatch(key)
        amount = _number(value) if match else None
        if match and amount is not None:
            by_kind[match[1]] = by_kind.get(match[1], 0) + amount
    for kind in ("total", "resident", "memory"):
        if kind in by_kind:
            return by_kind[kind]
    return None


def _number(value: str) -> int | None:
    """``1234``, ``1234 KiB`` or ``12 MiB`` in bytes (engine times in ns pass through)."""
    amount, _, unit = value.partition(" ")
    scale = _UNITS.get(unit.strip(), 1)
    try:
        return int(amount) * scale
    except ValueError:
        return None
