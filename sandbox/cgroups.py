"""A per-job cgroup parent, so that a job's CPU time and peak memory outlive its container.

The container's own cgroup is deleted the moment its last process exits, taking its
counters with it. Docker can place the container under a parent cgroup of our choosing;
the parent's counters are hierarchical (they include the dead child), so after the job
they still say how much CPU it used and how much memory it peaked at. Then the parent
is removed. This needs Docker's ``cgroupfs`` driver; under the ``systemd`` driver the
readings are reported as unknown rather than guessed.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable
from pathlib import Path

import msgspec

__all__ = ["JobCgroup", "Usage", "in_job_container", "job_cgroup_keys"]

_ROOT_PARENT = "gpu-agent"
_NS_PER_S = 1e9
_US_PER_S = 1e6


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """What a job used; None where the cgroup could not tell."""

    cpu_seconds: float | None
    peak_memory_bytes: int | None


class JobCgroup:
    """The cgroup parent of one job's container."""

    def __init__(self, job_key: str, cgroup_driver: str, root: Path = Path("/sys/fs/cgroup")):
        self._root = root
        self._v2 = (root / "cgroup.controllers").exists()
        self.relative = f"{_ROOT_PARENT}/{job_key}"
        self.parent: str | None = f"/{self.relative}" if cgroup_driver == "cgroupfs" else None
        """The value for ``HostConfig.CgroupParent``; None when it cannot be used."""

    def usage(self) -> Usage:
        """CPU seconds and peak memory of everything that ran under this parent."""
        if self.parent is None:
            return Usage(cpu_seconds=None, peak_memory_bytes=None)
        if self._v2:
            base = self._root / self.relative
            stat = _read(base / "cpu.stat")
            usec = next(
                (
                    int(line.split()[1])
                    for line in stat.splitlines()
                    if line.startswith("usage_usec")
                ),
                None,
            )
            cpu = usec / _US_PER_S if usec is not None else None
            return Usage(cpu_seconds=cpu, peak_memory_bytes=_read_int(base / "memory.peak"))
        ns = _read_int(self._v1_dir("cpuacct") / "cpuacct.usage")
        peak = _read_int(self._v1_dir("memory") / "memory.max_usage_in_bytes")
        return Usage(cpu_seconds=ns / _NS_PER_S if ns is not None else None, peak_memory_bytes=peak)

    def remove(self) -> bool:
        """Remove the parent, and what the runtime left under it, in every hierarchy;
        whether it is gone. Call it once the container is removed: whatever still runs
        under the parent is then a leftover of the job, and is killed."""
        if self.parent is None:
            return True
        dirs = [self._root / self.relative] if self._v2 else self._root.glob(f"*/{self.relative}")
        gone = True
        for directory in dirs:
            # A start that failed leaves the container's own cgroup (runc's, runsc's) in
            # the parent, and under runsc its sandbox in it for a while: removed deepest
            # first, then the parent can go.
            tree = sorted(
                [directory, *(Path(r) / n for r, names, _ in os.walk(directory) for n in names)],
                key=lambda path: len(path.parts),
                reverse=True,
            )
            for path in tree:
                for pid in _read(path / "cgroup.procs").split():
                    with contextlib.suppress(OSError):  # gone already, or not ours to end
                        os.kill(int(pid), signal.SIGKILL)
                try:
                    path.rmdir()
                except FileNotFoundError:
                    continue
                except OSError:
                    gone = False  # still busy: a process is still on its way out
        return gone

    def _v1_dir(self, controller: str) -> Path:
        for name in (controller, "cpu,cpuacct" if controller == "cpuacct" else controller):
            candidate = self._root / name / self.relative
            if candidate.is_dir():
                return candidate
        return self._root / controller / self.relative


def job_cgroup_keys(root: Path = Path("/sys/fs/cgroup")) -> set[str]:
    """The job keys of every job cgroup parent under ``root``, in any hierarchy."""
    pattern = (
        f"{_ROOT_PARENT}/*" if (root / "cgroup.controllers").exists() else f"*/{_ROOT_PARENT}/*"
    )
    return {path.name for path in root.glob(pattern) if path.is_dir()}


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii")
    except OSError:
        return ""


def _read_int(path: Path) -> int | None:
    text = _read(path).strip()
    return int(text) if text.isdigit() else None


def in_job_container(pid: int, container_ids: Iterable[str], proc: Path = Path("/proc")) -> bool:
    """Whether host process ``pid`` runs in one of our jobs' containers: under a job's
    cgroup parent (the cgroupfs driver), or in a cgroup named by a container's id (the
    systemd driver: ``.../docker-<id>.scope``). A process that is gone is not ours."""
    try:
        groups = (proc / str(pid) / "cgroup").read_text(encoding="utf-8")
    except OSError:
        return False
    if f"/{_ROOT_PARENT}/" in groups:
        return True
    return any(container_id in groups for container_id in container_ids if container_id)
