#!/usr/bin/python3 -I
"""Make gpu-agent's virtualenvs from the wheels its packages ship (``make-venv``).

Installed as ``/usr/lib/gpu-agent/make-venv`` by the gpu-agent package and run as root by
its postinst, by gpu-agent-tray's, and before each start of the service (``ExecStartPre=``),
where it costs one hash of a few small files when nothing changed. It makes:

- ``/opt/gpu-agent/venv``: the service, from ``/usr/lib/gpu-agent/`` (``wheels/`` and the
  lock ``requirements.txt``);
- ``/opt/gpu-agent/tray-venv``: the tray, from that and ``/usr/lib/gpu-agent-tray/`` (its
  Qt wheels and lock), only while gpu-agent-tray is installed; else it is removed.

Each venv is made for the interpreter ``python3`` is now, offline (``--no-index``), from
hash-checked wheels only, by the pip wheel shipped beside them (the same pip on every
release; the venv itself gets no pip). It is remade when its stamp (the interpreter, the
locks and the project's wheel) no longer matches: after an upgrade of the package, or of
``python3`` to a new minor version (a venv is tied to one).

A venv is built in a new directory beside the old (``venv.XXXXXXXX``), its stamp written
last, and ``venv`` is a symlink switched to it by one rename: whatever interrupts a build
leaves the previous venv in place, or none, never a half one; a later run removes the
leftovers. Runs take a lock, so two never build at once.

Stdlib only, Python 3.11 or newer: it runs on the system's ``python3``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MakeVenvError", "Source", "ensure", "main", "remove", "sources"]

PREFIX = Path("/opt/gpu-agent")
# This script's own directory, /usr/lib/gpu-agent, and the tray package's beside it.
LIB = Path(__file__).resolve().parent
TRAY_LIB = LIB.parent / "gpu-agent-tray"
LOCK = "requirements.txt"
STAMP = ".gpu-agent-stamp"
PROJECT_WHEEL = "gpu_provider_agent-*.whl"
PIP_WHEEL = "pip-*-py3-none-any.whl"
# A wheel for one CPython version only: its interpreter and ABI tags (cp312-cp312).
_CPYTHON = re.compile(r"-cp3(\d+)-cp3\1-")


class MakeVenvError(Exception):
    """A venv could not be made; the previous one, if any, is still in place."""

    code = "make_venv_failed"


@dataclass(frozen=True)
class Source:
    """What one venv is made from: its name under the prefix, its lock, its wheelhouses."""

    name: str
    lock: Path
    wheelhouses: tuple[Path, ...]


def sources(lib: Path = LIB, tray_lib: Path = TRAY_LIB) -> tuple[Source, Source | None]:
    """The service's venv source, and the tray's if gpu-agent-tray is installed."""
    service = Source("venv", lib / LOCK, (lib / "wheels",))
    if not (tray_lib / LOCK).is_file():
        return service, None
    return service, Source("tray-venv", tray_lib / LOCK, (lib / "wheels", tray_lib / "wheels"))


def _one(wheelhouse: Path, pattern: str) -> Path:
    found = sorted(wheelhouse.glob(pattern))
    if len(found) != 1:
        raise MakeVenvError(f"{wheelhouse} holds {len(found)} wheels {pattern}, not 1")
    return found[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _interpreter(python: str) -> tuple[Path, str]:
    """The interpreter ``python`` resolves to, and its ``major.minor`` version."""
    real = Path(os.path.realpath(python))
    try:
        shown = subprocess.run(
            [str(real), "-I", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        raise MakeVenvError(f"cannot run {python}: {error}") from error
    return real, shown


def stamp(source: Source, python: Path, version: str) -> str:
    """What a venv of ``source`` made with ``python`` must record to be current."""
    wheel = _one(source.wheelhouses[0], PROJECT_WHEEL)
    return (
        f"python {python} {version}\n"
        f"lock {_sha256(source.lock)}\n"
        f"wheel {wheel.name} {_sha256(wheel)}\n"
    )


def _current(link: Path, wanted: str) -> bool:
    try:
        return link.is_symlink() and (link / STAMP).read_text() == wanted
    except OSError:
        return False


@contextmanager
def _locked(prefix: Path) -> Iterator[None]:
    prefix.mkdir(mode=0o755, parents=True, exist_ok=True)
    with (prefix / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _pip(venv: Path, pip_wheel: Path, source: Source, *args: str | Path) -> None:
    # --isolated: no pip.conf nor PIP_* variable may add an index or a constraint.
    find_links = [arg for house in source.wheelhouses for arg in ("--find-links", str(house))]
    command = [
        str(venv / "bin" / "python"), "-I", str(pip_wheel / "pip"), "install", "--isolated",
        "--no-index", *find_links, "--only-binary", ":all:", "--no-cache-dir", "--quiet",
        "--disable-pip-version-check", "--no-warn-script-location", "--root-user-action",
        "ignore", *map(str, args),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise MakeVenvError(f"pip could not install {args[-1]}:\n{result.stderr.strip()}")


def _served(wheelhouse: Path) -> list[str]:
    """The Python versions the wheelhouse's version-specific wheels are for (``3.12``)."""
    tags = {found.group(1) for w in wheelhouse.glob("*.whl") if (found := _CPYTHON.search(w.name))}
    return [f"3.{tag}" for tag in sorted(tags, key=int)]


def _build(prefix: Path, source: Source, python: Path, version: str, wanted: str) -> None:
    """Build the venv in a new directory, then switch ``prefix/name`` to it."""
    lib = source.wheelhouses[0]
    pip_wheel, wheel = _one(lib, PIP_WHEEL), _one(lib, PROJECT_WHEEL)
    if (served := _served(lib)) and version not in served:
        raise MakeVenvError(
            f"{python} is Python {version}; the wheels are for Python {', '.join(served)}"
        )
    venv = Path(tempfile.mkdtemp(prefix=f"{source.name}.", dir=prefix))
    try:
        venv.chmod(0o755)  # the service's user reads it
        made = subprocess.run(
            [str(python), "-I", "-m", "venv", "--without-pip", str(venv)],
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0:
            raise MakeVenvError(f"{python} -m venv failed:\n{made.stderr.strip()}")
        _pip(venv, pip_wheel, source, "--require-hashes", "-r", source.lock)
        _pip(venv, pip_wheel, source, "--no-deps", wheel)
        # On disk before the stamp says it is whole (a stamp lost to a crash only means
        # a rebuild next time).
        os.sync()
        (venv / STAMP).write_text(wanted)
        _switch(prefix / source.name, venv)
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise


def _switch(link: Path, venv: Path) -> None:
    if link.exists() and not link.is_symlink():
        # A venv of an older package, a real directory: moved aside to be removed.
        link.rename(tempfile.mkdtemp(prefix=f"{link.name}.", dir=link.parent))
    new = link.parent / f".{link.name}.new"
    new.unlink(missing_ok=True)
    new.symlink_to(venv.name)
    new.replace(link)


def _leftovers(prefix: Path, name: str) -> None:
    """Remove every venv directory of ``name`` that ``prefix/name`` does not point to."""
    link = prefix / name
    keep = os.readlink(link) if link.is_symlink() else None
    for path in prefix.glob(f"{name}.*"):
        if path.name != keep and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


def remove(prefix: Path, name: str) -> None:
    """Remove the venv ``name`` and whatever is left of its builds."""
    (prefix / name).unlink(missing_ok=True)
    _leftovers(prefix, name)


def ensure(prefix: Path, source: Source, python: str) -> bool:
    """Make ``prefix/source.name`` current for ``python``; True if it was (re)made."""
    real, version = _interpreter(python)
    wanted = stamp(source, real, version)
    with _locked(prefix):
        link = prefix / source.name
        built = not _current(link, wanted)
        if built:
            _build(prefix, source, real, version, wanted)
        _leftovers(prefix, source.name)
    return built


def main(argv: Sequence[str] | None = None) -> int:
    """Make the venvs current (the tray's only with the tray); say which were made."""
    parser = argparse.ArgumentParser(prog="make-venv", description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="/usr/bin/python3", help="the interpreter")
    parser.add_argument("--prefix", type=Path, default=PREFIX, help="where the venvs live")
    args = parser.parse_args(argv)
    os.umask(0o022)
    service, tray = sources()
    try:
        for source in (service, tray):
            if source is None:
                with _locked(args.prefix):
                    remove(args.prefix, "tray-venv")
            elif ensure(args.prefix, source, args.python):
                print(f"make-venv: made {args.prefix / source.name} for {args.python}")
    except (MakeVenvError, OSError) as error:
        print(f"make-venv: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
