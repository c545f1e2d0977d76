"""Walking and removing a directory tree a job wrote, whatever shape it gave it.

A job controls what it writes under ``/output``: directories nested thousands deep, paths
far longer than ``PATH_MAX``, symlinks to host files, directories it made unreadable. So
the walk here is iterative (no recursion to exhaust), every open is relative to the
directory above it (no path is ever longer than one name), ``O_NOFOLLOW`` everywhere (a
symlink is an entry, never a way out), and it holds two descriptors at most however deep
it goes: it climbs back through ``..``, checking that ``..`` is the directory it came
from, so that a tree moved under it is noticed rather than walked outside.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["DIR_FLAGS", "TreeChanged", "open_dir", "remove_tree", "walk"]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK
_OWNER_RIGHTS = stat.S_IRWXU
_log = logging.getLogger(__name__)


class TreeChanged(Exception):
    """A directory's ``..`` is not the directory the walk came down from: it was moved."""


def open_dir(dir_fd: int, name: str) -> int:
    """Open the directory ``name`` in ``dir_fd``; OSError (ELOOP, ENOTDIR) if it is not one."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def walk(
    top: int,
    visit: Callable[[int, os.DirEntry[str]], bool],
    enter: Callable[[int, str], int | None] = open_dir,
    leave: Callable[[int, str], None] | None = None,
) -> None:
    """Walk the directory open as ``top`` depth first; ``top`` stays open, the caller's.

    ``visit(dir_fd, entry)`` sees every entry once and says whether to descend into it;
    ``enter(dir_fd, name)`` opens such a directory (None: skip it); ``leave(dir_fd, name)``
    is called in the parent once the directory ``name`` is walked. OSError from any of
    them ends the walk; TreeChanged when the tree was moved under it.
    """
    fd = os.dup(top)
    # Above fd: each directory's identity, its subdirectories left to walk, and the name
    # of the one fd is.
    above: list[tuple[tuple[int, int], list[str], str]] = []
    try:
        pending = _scan(fd, visit)
        while True:
            if pending:
                name = pending.pop()
                child = enter(fd, name)
                if child is None:
                    continue
                above.append((_identity(fd), pending, name))
                os.close(fd)
                fd = child
                pending = _scan(fd, visit)
                continue
            if not above:
                return
            identity, pending, name = above.pop()
            parent = os.open("..", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            if _identity(fd) != identity:
                raise TreeChanged(f"{name!r} was moved during the walk")
            if leave is not None:
                leave(fd, name)
    finally:
        os.close(fd)


def _scan(fd: int, visit: Callable[[int, os.DirEntry[str]], bool]) -> list[str]:
    # scandir(fd) reads through a duplicate of fd: fd stays open, the caller's to close.
    with os.scandir(fd) as entries:
        return [entry.name for entry in entries if visit(fd, entry)]


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def remove_tree(path: Path) -> bool:
    """``rm -rf path``, giving back the owner's rights the job took away; whether it is gone.

    Never raises: what cannot be removed is logged and left for the next reap.
    """
    try:
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return True
    except OSError as exc:
        _log.warning("cannot remove %s: %s; left for the next reap", path, exc)
        return False
    try:
        left = _remove(parent, path.name)
    finally:
        os.close(parent)
    if left:
        _log.warning("could not remove all of %s (%s); left for the next reap", path, left[0])
    return not left


def _remove(parent: int, name: str) -> list[str]:
    """Remove ``name`` in ``parent`` and all below it; what could not be removed, and why."""
    left: list[str] = []

    def note(what: str, exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):  # gone already: what was asked
            left.append(f"{what}: {exc.strerror}")

    def visit(fd: int, entry: os.DirEntry[str]) -> bool:
        if entry.is_dir(follow_symlinks=False):
            return True
        try:
            os.unlink(entry.name, dir_fd=fd)
        except OSError as exc:
            note(entry.name, exc)
        return False

    def enter(fd: int, child: str) -> int | None:
        try:
            return _enter_owned(fd, child)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):  # not a directory (any more)
                try:
                    os.unlink(child, dir_fd=fd)
                except OSError as unlinked:
                    note(child, unlinked)
            else:
                note(child, exc)
            return None

    def leave(fd: int, child: str) -> None:
        try:
            os.rmdir(child, dir_fd=fd)
        except OSError as exc:
            note(child, exc)

    try:
        os.unlink(name, dir_fd=parent)  # a file: done
        return left
    except IsADirectoryError:
        pass
    except OSError as exc:
        note(name, exc)
        return left
    try:
        top = _enter_owned(parent, name)
        try:
            walk(top, visit, enter, leave)
        finally:
            os.close(top)
        os.rmdir(name, dir_fd=parent)
    except OSError as exc:
        note(name, exc)
    except TreeChanged as exc:
        left.append(str(exc))
    return left


def _enter_owned(dir_fd: int, name: str) -> int:
    """Open a directory to empty it, first giving back the rights its owner needs for that."""
    try:
        fd = open_dir(dir_fd, name)
    except PermissionError:
        # Made unreadable (mode 000): chmod it through an O_PATH descriptor, which needs
        # no rights on it and, with O_NOFOLLOW and O_DIRECTORY, is never a symlink.
        handle = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            os.chmod(f"/proc/self/fd/{handle}", _OWNER_RIGHTS)
        finally:
            os.close(handle)
        return open_dir(dir_fd, name)
    mode = os.fstat(fd).st_mode
    if mode & _OWNER_RIGHTS != _OWNER_RIGHTS and os.geteuid() != 0:
        # Without write and search rights its entries cannot be removed. If it is not
        # ours to change, the removals below fail and say so.
        with contextlib.suppress(OSError):
            os.fchmod(fd, stat.S_IMODE(mode) | _OWNER_RIGHTS)
    return fd
