"""A job's own directory on the host: its inputs, its outputs, and who it belongs to.

``jobs_dir/<job id>/`` holds ``runner`` (the runner instance that owns the job, so that a
later runner reaps it only once that instance is gone), ``container`` (the container id,
so that a gVisor sandbox Docker forgot can still be found), ``input/`` (mounted read-only)
and ``output/`` (the one host directory a job may write; watched while it runs). Inputs
the agent fetched are host files of its cache: ``input/`` holds an empty file where each
goes, and the cached file is bound read-only over it.
"""

from __future__ import annotations

import base64
import errno
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import msgspec

from sandbox.errors import RunError
from sandbox.fstree import DIR_FLAGS, TreeChanged, open_dir, remove_tree, walk
from sandbox.spec import WorkloadSpec

__all__ = [
    "JOB_ID",
    "JobDir",
    "JobMounts",
    "Leftover",
    "instance_alive",
    "leftovers",
    "live_jobs",
    "remove_tree",
    "runner_instance",
]

# Watching the output directory stops counting past this many entries: a job that makes
# millions of files must not make the agent spend its time walking them.
_MAX_OUTPUT_ENTRIES = 10_000
# A tree moved under the walk is walked again, this many times in all, then counts as over.
_MEASURE_ATTEMPTS = 3
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# What a job id may be: it names a directory, a container and a cgroup.
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class JobMounts(msgspec.Struct, frozen=True, kw_only=True):
    """Host directories of the job's own: inputs (read-only) and outputs; and host files
    bound read-only at paths under /input (``(path under /input, host file)``)."""

    input_dir: Path | None = None
    output_dir: Path | None = None
    input_files: tuple[tuple[str, Path], ...] = ()


class Leftover(msgspec.Struct, frozen=True, kw_only=True):
    """A job directory some runner left behind."""

    path: Path
    runner: str
    container_id: str | None


def runner_instance() -> str:
    """This process as a runner: boot, pid and start time (a pid alone gets reused)."""
    return f"{_boot_id()}:{os.getpid()}:{_start_time(os.getpid())}"


def instance_alive(instance: str) -> bool:
    """Whether the runner instance that wrote ``instance`` is still running."""
    boot, _, rest = instance.partition(":")
    pid_text, _, started = rest.partition(":")
    if boot != _boot_id() or not pid_text.isdigit():
        return False
    return _start_time(int(pid_text)) == started


def _boot_id() -> str:
    try:
        return _BOOT_ID.read_text(encoding="ascii").strip()
    except OSError:
        return "unknown-boot"


def _start_time(pid: int) -> str:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""
    return stat_line.rsplit(")", 1)[1].split()[19]  # field 22: starttime, in clock ticks


def _readable_dir(path: Path) -> None:
    """Make ``path`` (if new) readable by a job of any uid, whatever this process's umask
    (the service's is 0027)."""
    if not path.is_dir():
        path.mkdir()
        path.chmod(0o755)


class JobDir:
    """The directory of one job while it runs."""

    def __init__(self, jobs_dir: Path, job_id: str) -> None:
        self.path = jobs_dir / job_id

    def create(self, runner: str) -> None:
        """Make the directory and record which runner owns it."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.mkdir(mode=0o711)
        (self.path / "runner").write_text(runner, encoding="ascii")

    def record_container(self, container_id: str) -> None:
        """Remember the job's container, for a reaper that finds Docker has forgotten it."""
        (self.path / "container").write_text(container_id, encoding="ascii")

    def mounts(self, spec: WorkloadSpec, fetched: Mapping[str, Path] | None = None) -> JobMounts:
        """Write the inputs and make the output directory the spec asks for.

        ``fetched`` maps the path of each input given by URL to its host file (RunError
        ``input_missing`` if one is not there).
        """
        fetched = fetched or {}
        input_dir = output_dir = None
        files: list[tuple[str, Path]] = []
        if spec.inputs:
            input_dir = self.path / "input"
            _readable_dir(input_dir)
            for item in spec.inputs:
                target = input_dir / item.path
                for parent in reversed(target.relative_to(input_dir).parents[:-1]):
                    _readable_dir(input_dir / parent)
                if item.content is None:
                    host = fetched.get(item.path)
                    if host is None or not host.is_file():
                        raise RunError("input_missing", f"input {item.path!r} was not fetched")
                    # The mount point: under a read-only /input the runtime cannot make it.
                    target.touch(mode=0o444)
                    files.append((str(PurePosixPath("/input") / item.path), host))
                    continue
                data = (
                    base64.b64decode(item.content)
                    if item.encoding == "base64"
                    else item.content.encode()
                )
                target.write_bytes(data)
                target.chmod(item.mode)
        if spec.outputs:
            output_dir = self.path / "output"
            output_dir.mkdir()
            output_dir.chmod(0o777)  # writable by the job's uid; only we can reach it
        return JobMounts(input_dir=input_dir, output_dir=output_dir, input_files=tuple(files))

    def output_overflow(self, max_bytes: int) -> str | None:
        """Why the output directory is over its limits now, or None while it is within.

        What cannot be measured counts as over: a directory the job made unreadable, or a
        tree it keeps moving under the walk, would otherwise hide what it holds.
        """
        for _ in range(_MEASURE_ATTEMPTS):
            try:
                return _usage_over(self.path / "output", max_bytes)
            except TreeChanged:
                continue  # moved under the walk: walk it again
            except OSError as exc:
                return f"cannot measure all of /output: {exc.strerror or exc}"
        return "/output kept changing while its size was measured"

    def remove(self) -> None:
        """Delete the directory, whatever the job left in it; what cannot be is logged."""
        remove_tree(self.path)


class _Over(Exception):
    """The output directory is over a limit; the message says which."""


def _usage_over(root: Path, max_bytes: int) -> str | None:
    """Walk ``root`` counting entries and allocated bytes; which limit it is over, if one."""
    used = entries = 0

    def visit(fd: int, entry: os.DirEntry[str]) -> bool:
        nonlocal used, entries
        entries += 1
        if entries > _MAX_OUTPUT_ENTRIES:
            raise _Over(f"more than {_MAX_OUTPUT_ENTRIES} files in /output")
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return False  # deleted since it was listed: it holds nothing now
        used += info.st_blocks * 512
        if used > max_bytes:
            raise _Over(f"/output holds more than {max_bytes} bytes")
        return stat.S_ISDIR(info.st_mode)

    def enter(fd: int, name: str) -> int | None:
        try:
            return open_dir(fd, name)
        except FileNotFoundError:
            return None  # deleted since it was listed
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise TreeChanged(f"{name!r} is no longer a directory") from exc
            raise

    try:
        top = os.open(root, DIR_FLAGS)
        try:
            walk(top, visit, enter)
        finally:
            os.close(top)
    except _Over as over:
        return str(over)
    return None


def leftovers(jobs_dir: Path) -> list[Leftover]:
    """Job directories whose runner is no longer running."""
    found = []
    try:
        entries = sorted(jobs_dir.iterdir())
    except OSError:
        return []
    for path in entries:
        runner = _read(path / "runner")
        if runner and instance_alive(runner):
            continue
        found.append(
            Leftover(path=path, runner=runner, container_id=_read(path / "container") or None)
        )
    return found


def live_jobs(jobs_dir: Path) -> set[str]:
    """The ids of the jobs whose directory a runner that is still running holds."""
    try:
        entries = sorted(jobs_dir.iterdir())
    except OSError:
        return set()
    return {path.name for path in entries if instance_alive(_read(path / "runner"))}


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError:
        return ""
