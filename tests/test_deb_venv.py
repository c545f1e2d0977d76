"""The packages installed: the shipped make-venv, run from the built packages' files for
each Python they are for (3.11, 3.12, 3.13: pyenv's here), offline; what an interrupted or
failed build leaves; and dpkg -i for real in a throwaway overlay of this machine. The
packages are built once for this module, as tests/test_deb.py builds them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from test_deb import PYTHONS, Debs, debs
from test_packaging import ROOT

from hal import __version__

__all__ = ["debs"]  # the module-scoped fixture, built once for this module too

# A venv with Qt is some seconds of unzipping; a build of the packages more.
pytestmark = pytest.mark.timeout(900)


def _python(version: tuple[int, int]) -> str:
    """An interpreter of ``version``: pyenv's, else one on PATH; skip if there is none."""
    major, minor = version
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(pyenv.glob(f"{major}.{minor}.*/bin/python{major}.{minor}"))
    path = str(found[-1]) if found else shutil.which(f"python{major}.{minor}")
    if path is None:
        pytest.skip(f"no Python {major}.{minor} here (pyenv install {major}.{minor}) to test it")
    return path


@pytest.fixture(scope="module")
def lib(debs: Debs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpu-agent's /usr/lib alone (no tray), as installed, in a tree of its own."""
    root = tmp_path_factory.mktemp("service")
    subprocess.run(["dpkg-deb", "-x", str(debs.service), str(root)], check=True, timeout=60)
    return root / "usr/lib"


def _make_venv(lib: Path, prefix: Path, python: str) -> subprocess.CompletedProcess[str]:
    """Run the shipped make-venv from ``lib``; with no network at all where root can
    unshare one (it installs with --no-index, and this shows it)."""
    offline = ["unshare", "--net"] if os.geteuid() == 0 and shutil.which("unshare") else []
    command = [*offline, str(lib / "gpu-agent/make-venv"), "--python", python]
    return subprocess.run(
        [*command, "--prefix", str(prefix)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def _run(venv: Path, *args: str) -> str:
    return subprocess.run(
        [str(venv / "bin/python"), "-I", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()


def _pins(*locks: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for lock in locks:
        found = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", (ROOT / lock).read_text(), re.M)
        pins.update({canonicalize_name(name): version for name, version in found})
    return pins


def _installed(venv: Path) -> dict[str, str]:
    (site,) = venv.glob("lib/python3.*/site-packages")
    named = [info.name.removesuffix(".dist-info").split("-") for info in site.glob("*.dist-info")]
    return {canonicalize_name(name): version for name, version in named}


_USE = (
    "import msgspec, websockets, psutil, platformdirs, pynvml; "
    "from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey; "
    "import agent.daemon, coordinator.cli; "
    "key = Ed25519PrivateKey.generate(); key.public_key().verify(key.sign(b'x'), b'x'); "
    "print(msgspec.json.encode({'ok': True}).decode())"
)


@pytest.mark.parametrize("version", PYTHONS, ids=lambda v: f"{v[0]}.{v[1]}")
def test_make_venv_makes_a_working_venv_for_each_python_offline(
    lib: Path, tmp_path: Path, version: tuple[int, int]
) -> None:
    python = _python(version)
    said = _ok(_make_venv(lib, tmp_path, python))
    venv = tmp_path / "venv"
    assert said == f"make-venv: made {venv} for {python}\n"
    assert _run(venv, str(venv / "bin/gpu-agent"), "--version") == f"gpu-agent {__version__}"
    assert _run(venv, "-c", _USE) == '{"ok":true}'
    assert os.path.realpath(venv / "bin/python") == os.path.realpath(python)
    assert (venv / f"lib/python{version[0]}.{version[1]}/site-packages").is_dir()
    # Exactly the lock and the project: no pip, no Qt, no tray venv.
    assert _installed(venv) == {**_pins("requirements.txt"), "gpu-provider-agent": __version__}
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(
        [os.readlink(venv), "venv"]
    )


def _venvs(prefix: Path) -> list[str]:
    """The venv directories under ``prefix`` (the ``venv`` link's target among them)."""
    return sorted(p.name for p in prefix.glob("venv.*") if p.is_dir() and not p.is_symlink())


def test_a_current_venv_is_kept_and_a_new_python_gets_a_new_one(lib: Path, tmp_path: Path) -> None:
    # python3 upgraded to the next minor version (Debian 12 -> 13's 3.11 -> 3.13): the
    # service's ExecStartPre remakes the venv; any other start leaves it as it is.
    old, new = _python(PYTHONS[0]), _python(PYTHONS[-1])
    venv = tmp_path / "venv"
    _ok(_make_venv(lib, tmp_path, old))
    first = os.readlink(venv)
    assert _ok(_make_venv(lib, tmp_path, old)) == ""
    assert (os.readlink(venv), _venvs(tmp_path)) == (first, [first])
    assert _ok(_make_venv(lib, tmp_path, new)) == f"make-venv: made {venv} for {new}\n"
    assert os.readlink(venv) != first
    assert _venvs(tmp_path) == [os.readlink(venv)]
    assert _run(venv, "-c", "import sys; print(sys.version_info[:2])") == str(PYTHONS[-1])
    assert _run(venv, "-c", _USE) == '{"ok":true}'


def _broken_copy(lib: Path, tmp_path: Path) -> Path:
    """``lib`` with one locked wheel whose bytes no longer match the lock's hash."""
    copy = tmp_path / "lib"
    shutil.copytree(lib, copy, symlinks=True)
    (wheel,) = (copy / "gpu-agent/wheels").glob("platformdirs-*.whl")
    wheel.write_bytes(wheel.read_bytes()[:-100])
    return copy


def test_a_failed_install_leaves_the_previous_venv_and_no_half_one(
    lib: Path, tmp_path: Path
) -> None:
    prefix = tmp_path / "opt"
    broken = _broken_copy(lib, tmp_path)
    failed = _make_venv(broken, prefix, _python(PYTHONS[0]))
    assert failed.returncode == 1
    assert failed.stderr.startswith("make-venv: pip could not install ")
    assert "HASHES" in failed.stderr  # pip's refusal of a wheel that is not the locked one
    assert not (prefix / "venv").exists()
    assert _venvs(prefix) == []
    # With a venv in place, a failed remake (for a new python) keeps it, whole.
    _ok(_make_venv(lib, prefix, _python(PYTHONS[0])))
    kept = os.readlink(prefix / "venv")
    assert _make_venv(broken, prefix, _python(PYTHONS[-1])).returncode == 1
    assert (os.readlink(prefix / "venv"), _venvs(prefix)) == (kept, [kept])
    assert _ok(_make_venv(lib, prefix, _python(PYTHONS[0]))) == ""  # still current


def test_an_interrupted_build_is_never_taken_for_a_venv(lib: Path, tmp_path: Path) -> None:
    # An interpreter that has make-venv killed (SIGKILL: no clean-up) once the new venv's
    # directory is made and before anything is installed in it.
    real = os.path.realpath(_python(PYTHONS[0]))
    killer = tmp_path / "python"
    killer.write_text(
        f'#!/bin/sh\n"{real}" "$@"; status=$?\n'
        'case "$*" in *"-m venv"*) kill -KILL "$PPID" ;; esac\nexit $status\n'
    )
    killer.chmod(0o755)
    prefix = tmp_path / "opt"
    assert _make_venv(lib, prefix, str(killer)).returncode in (-9, 137)
    (left,) = _venvs(prefix)  # half made, and left behind...
    assert (prefix / left / "bin/python").exists()
    assert not (prefix / "venv").exists()  # ...but not the venv
    _ok(_make_venv(lib, prefix, real))
    assert _venvs(prefix) == [os.readlink(prefix / "venv")] != [left]  # the leftover is gone
    # An older package's venv, a real directory, is replaced too.
    shutil.rmtree(prefix)
    (prefix / "venv/bin").mkdir(parents=True)
    _ok(_make_venv(lib, prefix, real))
    assert (prefix / "venv").is_symlink()
    assert _venvs(prefix) == [os.readlink(prefix / "venv")]


def test_a_python_the_wheels_do_not_serve_is_refused_clearly(lib: Path, tmp_path: Path) -> None:
    old = _python((3, 10))  # older than the oldest release's; a newer one alike
    refused = _make_venv(lib, tmp_path, old)
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == (
        f"make-venv: {os.path.realpath(old)} is Python 3.10; "
        "the wheels are for Python 3.11, 3.12, 3.13\n"
    )
    assert _venvs(tmp_path) == []
    assert not (tmp_path / "venv").exists()
    missing = _make_venv(lib, tmp_path, str(tmp_path / "no-python"))
    assert (missing.returncode, missing.stderr.startswith("make-venv: cannot run ")) == (1, True)


def test_the_tray_venv_is_made_while_the_tray_is_installed(debs: Debs, tmp_path: Path) -> None:
    # Both packages' files: the tray's wheelhouse is there.
    prefix, python = tmp_path / "opt", "/usr/bin/python3"
    _ok(_make_venv(debs.root / "usr/lib", prefix, python))
    tray, service = prefix / "tray-venv", os.readlink(prefix / "venv")
    assert _installed(tray) == {
        **_pins("requirements-tray.txt"),
        "gpu-provider-agent": __version__,
    }
    assert "pyside6-essentials" not in _installed(prefix / "venv")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    draw = (
        "from PySide6.QtWidgets import QApplication; app = QApplication([]); "
        "from agent.tray.app import Tray; from agent.tray import icons; "
        "print(icons.pixmap('busy', 22).width())"
    )
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(runtime)}
    shown = subprocess.run(
        [str(tray / "bin/python"), "-I", "-c", draw],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    assert shown.stdout.strip() == "22"
    # The tray removed (its wheelhouse gone): its venv goes, the service's is not touched.
    shutil.copytree(debs.root / "usr/lib/gpu-agent", tmp_path / "lib/gpu-agent", symlinks=True)
    assert _ok(_make_venv(tmp_path / "lib", prefix, python)) == ""
    assert not tray.exists()
    assert list(prefix.glob("tray-venv*")) == []
    assert os.readlink(prefix / "venv") == service


# The packages installed, in a throwaway copy of this machine

_INSTALL = r"""
set -e
root=$1/merged
mount -t overlay overlay -o "lowerdir=/,upperdir=$1/upper,workdir=$1/work" "$root" || exit 90
for fs in proc dev sys; do mount --rbind "/$fs" "$root/$fs"; done
mount -t tmpfs tmpfs "$root/tmp"
cp "$2" "$root/tmp/gpu-agent.deb"
cp "$3" "$root/tmp/gpu-agent-tray.deb"
exec chroot "$root" sh -c '
    [ "$1" = sysusers ] || rm /usr/bin/systemd-sysusers  # as in a container without it
    dpkg -i /tmp/gpu-agent.deb >/dev/null
    echo "user=$(getent passwd gpu-agent | cut -d: -f6,7)"
    echo "groups=$(for g in gpu-agent docker video render; do getent group $g | cut -d: -f1; \
        done | tr "\n" " ")"
    echo "verify=$(systemd-analyze verify --man=no gpu-agent.service 2>&1; echo rc $?)"
    echo "version=$(gpu-agent --version)"
    echo "headless=$(ls /opt/gpu-agent | tr "\n" " ")"
    echo "prestart=$(/usr/lib/gpu-agent/make-venv; echo rc $?)"
    echo "system=$(runuser -u gpu-agent -- /opt/gpu-agent/venv/bin/python -c "
from agent.config.settings import is_system_install; print(is_system_install())")"
    service=$(readlink /opt/gpu-agent/venv)
    dpkg -i /tmp/gpu-agent-tray.deb >/dev/null
    mkdir -m 700 /tmp/run
    echo "tray=$(XDG_RUNTIME_DIR=/tmp/run systemd-analyze --user verify --man=no \
        gpu-agent-tray.service 2>&1; echo rc $?)"
    test -x /usr/bin/gpu-agent-tray && echo "launcher=ok"
    echo "qt=$(QT_QPA_PLATFORM=offscreen /opt/gpu-agent/tray-venv/bin/python -c "
from PySide6.QtWidgets import QApplication; print(type(QApplication([])).__name__)")"
    dpkg -r gpu-agent-tray >/dev/null
    echo "tray_removed=$(ls /opt/gpu-agent | tr "\n" " ")"
    [ "$(readlink /opt/gpu-agent/venv)" = "$service" ] && echo "tray_left_service_venv=yes"
    echo "autostart=$(ls /etc/xdg/autostart | grep -c gpu-agent)"
    dpkg -P gpu-agent-tray >/dev/null
    echo "autostart_purged=$(ls /etc/xdg/autostart | grep -c gpu-agent)"
    ln -sf "$2" /usr/bin/python3  # python3 upgraded to its next minor version
    dpkg-trigger --no-await /usr/bin/python3
    dpkg --triggers-only --pending | grep -c "make-venv: made /opt/gpu-agent/venv" | \
        sed "s/^/triggered=/"
    echo "upgraded=$(gpu-agent --version) $(ls /opt/gpu-agent/venv/lib)"
    [ "$(readlink /opt/gpu-agent/venv)" != "$service" ] && echo "service_venv=remade"
    dpkg -r gpu-agent >/dev/null
    echo "removed=$(ls -A /opt/gpu-agent 2>/dev/null | wc -l) $(ls /etc/gpu-agent)"
    dpkg -P gpu-agent >/dev/null
    echo "purged=$(ls /etc/gpu-agent 2>/dev/null | wc -l)"
' sh "$4" "$5"
"""


@pytest.mark.parametrize("sysusers", ["sysusers", "no-sysusers"])
def test_the_packages_install_run_and_remove_cleanly(
    debs: Debs, tmp_path: Path, sysusers: str
) -> None:
    # dpkg -i for real, in a private mount namespace over an overlay of this machine's
    # root: the maintainer scripts run (make-venv with this machine's python3), the venvs
    # run from their real paths, and the units are verified with their real ExecStart=;
    # this machine itself is left untouched. Without systemd-sysusers (a container),
    # postinst makes the same user with useradd.
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for an overlay of /")
    for name in ("upper", "work", "merged"):
        (tmp_path / name).mkdir()
    namespace = ["unshare", "--mount", "--propagation", "private"]
    newer = os.path.realpath(_python(PYTHONS[-1]))
    script = [str(tmp_path), str(debs.service), str(debs.tray), sysusers, newer]
    result = subprocess.run(
        [*namespace, "sh", "-c", _INSTALL, "sh", *script],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode == 90:
        pytest.skip(f"cannot mount an overlay of / here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    said = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert said.pop("groups").split() == ["gpu-agent", "docker", "video", "render"]
    # The service's venv and its directory; no tray-venv, so no Qt, without the tray.
    headless = said.pop("headless")
    assert re.fullmatch(r"venv venv\.\w+ ", headless)
    assert said == {
        "user": "/var/lib/gpu-agent:/usr/sbin/nologin",
        "verify": "rc 0",  # ExecStartPre= and ExecStart= exist
        "version": f"gpu-agent {__version__}",
        "prestart": "rc 0",  # the unit's ExecStartPre=: current, nothing to say
        "system": "True",
        "tray": "rc 0",
        "launcher": "ok",
        "qt": "QApplication",
        "tray_removed": headless,  # as before the tray
        "service_venv": "remade",
        "triggered": "1",
        "upgraded": f"gpu-agent {__version__} python{PYTHONS[-1][0]}.{PYTHONS[-1][1]}",
        "tray_left_service_venv": "yes",
        "autostart": "1",  # a removed package keeps its conffiles...
        "autostart_purged": "0",  # ...until it is purged
        "removed": "0 agent.toml",
        "purged": "0",
    }
