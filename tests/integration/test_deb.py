"""The two packages, gpu-agent and gpu-agent-tray: what the build script refuses, what is
in which package, their copyright, changelog and manual pages, lintian, and dpkg -i for
real in a throwaway overlay of this machine. They are built once per module by
``scripts/build_deb.py``, as ``make deb`` builds them (a minute with pip's cache warm).
"""

from __future__ import annotations

import gzip
import importlib
import marshal
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.packaging import EXEC_START, PACKAGING, TRAY_EXEC_START, require_tool
from support.paths import ROOT

from agent import cli
from hal import __version__

# The packages are built for the interpreter python3 is here, and name its minor version.
BASE_PYTHON = os.path.realpath("/usr/bin/python3")
PYTHON = Path(BASE_PYTHON).name
VERSION = f"{__version__}-1"
ARCH = subprocess.run(
    ["dpkg", "--print-architecture"], capture_output=True, text=True, check=False
).stdout.strip()

# Building both packages (a venv with Qt, compiled) takes a minute or two on a busy
# machine, lintian on them as long: more than the default per-test limit, in whichever
# test first asks for them.
pytestmark = pytest.mark.timeout(900)


# The build script's refusals and findings, without a build


@pytest.fixture
def build_deb(monkeypatch: pytest.MonkeyPatch) -> Any:
    """scripts/build_deb.py as a module."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("scripts.build_deb")


def test_a_tray_lock_that_pins_the_service_deps_otherwise_is_refused(
    build_deb: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tray = tmp_path / "tray.txt"
    locked = (ROOT / "requirements-tray.txt").read_text()
    tray.write_text(re.sub(r"^msgspec==\S+", "msgspec==0.19.0", locked, flags=re.M))
    monkeypatch.setattr(build_deb, "TRAY_LOCK", tray)
    with pytest.raises(SystemExit, match=r"differ on \['msgspec'\]"):
        build_deb.build(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_python_older_than_3_11_is_refused(build_deb: Any, tmp_path: Path) -> None:
    old = tmp_path / "python3"
    old.write_text("#!/bin/sh\necho 3.10\n")
    old.chmod(0o755)
    with pytest.raises(SystemExit, match=r"Python 3\.10; 3\.11 or newer needed"):
        build_deb.build(tmp_path / "out", str(old))


def test_libc_is_required_at_the_newest_glibc_symbol_version_used(
    build_deb: Any, tmp_path: Path
) -> None:
    elf = b"\x7fELF\x02\x01\x01\0"
    (tmp_path / "a.so").write_bytes(elf + b"\0GLIBC_2.17\0GLIBC_2.2.5\0")
    (tmp_path / "b.so").write_bytes(elf + b"\0GLIBC_2.34\0")
    (tmp_path / "notes.txt").write_bytes(b"GLIBC_2.99\0")  # not an ELF file: not linked
    assert build_deb.glibc_needed(tmp_path) == "2.34"


# The packages


@dataclass(frozen=True)
class Debs:
    """The two packages, built as `make deb` builds them, and their files unpacked."""

    service: Path
    tray: Path
    root: Path
    """Both packages' files under one root, as installed together."""


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Debs:
    require_tool("dpkg-deb", "/usr/bin/python3")
    out = tmp_path_factory.mktemp("deb")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/build_deb.py"), "--out", str(out)],
        capture_output=True,
        check=True,
        timeout=600,
    )
    service = out / f"gpu-agent_{VERSION}_{ARCH}.deb"
    tray = out / f"gpu-agent-tray_{VERSION}_{ARCH}.deb"
    assert sorted(out.glob("*.deb")) == sorted([service, tray])
    root = tmp_path_factory.mktemp("root")
    for package in (service, tray):
        subprocess.run(["dpkg-deb", "-x", str(package), str(root)], check=True, timeout=60)
    return Debs(service, tray, root)


def _dpkg_deb(*args: str) -> str:
    return subprocess.run(
        ["dpkg-deb", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def _fields(deb: Path) -> dict[str, str]:
    shown = _dpkg_deb("-f", str(deb), "Package", "Version", "Depends", "Recommends")
    return dict(line.split(": ", 1) for line in shown.splitlines())


def _paths(deb: Path) -> set[str]:
    """The package's files and links (not directories), as /-rooted paths."""
    return {
        line.split(None, 5)[5].split(" -> ")[0].removeprefix(".")
        for line in _dpkg_deb("-c", str(deb)).splitlines()
        if not line.startswith("d")
    }


def test_the_packages_say_what_they_are_and_need(debs: Debs) -> None:
    libc = re.compile(r"libc6 \(>= 2\.\d+\)")
    service = _fields(debs.service)
    assert (service["Package"], service["Version"]) == ("gpu-agent", VERSION)
    python, glibc = service["Depends"].split(", ")
    # The venv is tied to the minor version of the python3 it was built with.
    assert python == BASE_PYTHON.removeprefix("/usr/bin/")
    assert libc.fullmatch(glibc)
    assert service["Recommends"] == "docker.io | docker-ce"
    tray = _fields(debs.tray)
    assert (tray["Package"], tray["Version"]) == ("gpu-agent-tray", VERSION)
    same, python, glibc = tray["Depends"].split(", ")
    assert (same, python) == (f"gpu-agent (= {VERSION})", BASE_PYTHON.removeprefix("/usr/bin/"))
    assert libc.fullmatch(glibc)
    assert "libxcb-cursor0" in tray["Recommends"]


_TRAY_FILES = (
    "/usr/bin/gpu-agent-tray",
    "/usr/lib/systemd/user/gpu-agent-tray.service",
    "/usr/share/applications/gpu-agent-tray.desktop",
    "/etc/xdg/autostart/gpu-agent-tray.desktop",
    "/usr/share/icons/hicolor/scalable/apps/gpu-agent-tray.svg",
    TRAY_EXEC_START,
)


def test_a_headless_server_gets_no_qt_and_the_tray_gets_only_its_own(debs: Debs) -> None:
    service, tray = _paths(debs.service), _paths(debs.tray)
    assert service.isdisjoint(tray)  # dpkg refuses two packages that share a file
    assert not any(re.search(r"PySide6|shiboken6|gpu-agent-tray", path) for path in service)
    assert EXEC_START in service
    assert set(_TRAY_FILES) <= tray
    site = f"/opt/gpu-agent/venv/lib/{PYTHON}/site-packages/"
    tray_venv = {path for path in tray if path.startswith("/opt/")}
    assert {path.removeprefix(site).split("/")[0] for path in tray_venv - {TRAY_EXEC_START}} == {
        "PySide6",
        "pyside6_essentials-6.11.3.dist-info",
        "shiboken6",
        "shiboken6-6.11.3.dist-info",
    }
    # PySide6's tools for app developers stay out.
    assert not any("/PySide6/scripts/" in p or "/bin/pyside6-" in p for p in tray)


def test_the_packages_install_the_units_the_sysusers_file_and_the_config(debs: Debs) -> None:
    for shipped, source in (
        ("usr/lib/systemd/system/gpu-agent.service", "gpu-agent.service"),
        ("usr/lib/sysusers.d/gpu-agent.conf", "gpu-agent.sysusers"),
        ("etc/gpu-agent/agent.toml", "agent.toml"),
        ("usr/lib/systemd/user/gpu-agent-tray.service", "gpu-agent-tray.service"),
        ("usr/share/applications/gpu-agent-tray.desktop", "gpu-agent-tray.desktop"),
        ("etc/xdg/autostart/gpu-agent-tray.desktop", "gpu-agent-tray.desktop"),
        ("usr/share/icons/hicolor/scalable/apps/gpu-agent-tray.svg", "gpu-agent-tray.svg"),
        ("usr/share/lintian/overrides/gpu-agent", "gpu-agent.lintian-overrides"),
        ("usr/share/lintian/overrides/gpu-agent-tray", "gpu-agent-tray.lintian-overrides"),
    ):
        assert (debs.root / shipped).read_bytes() == (PACKAGING / source).read_bytes()
    assert (debs.root / "usr/share/doc/gpu-agent/configuration.md").is_file()


def _control(deb: Path, tmp_path: Path) -> Path:
    control = tmp_path / deb.name
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    return control


def test_the_configs_are_conffiles_and_the_maintainer_scripts_are_there(
    debs: Debs, tmp_path: Path
) -> None:
    service, tray = _control(debs.service, tmp_path), _control(debs.tray, tmp_path)
    assert (service / "conffiles").read_text().split() == ["/etc/gpu-agent/agent.toml"]
    # An admin may delete the autostart entry: kept so.
    assert (tray / "conffiles").read_text().split() == ["/etc/xdg/autostart/gpu-agent-tray.desktop"]
    for script in ("postinst", "prerm", "postrm"):
        assert os.access(service / script, os.X_OK)
    assert "systemd-sysusers" in (service / "postinst").read_text()


def _dep5(text: str) -> list[dict[str, str]]:
    """A DEP-5 file's paragraphs: field -> value (continuation lines joined by newlines)."""
    paragraphs = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        name = ""
        for line in block.splitlines():
            if line.startswith(" "):
                fields[name] += "\n" + line[1:]
            else:
                name, value = line.split(":", 1)
                fields[name] = value.strip()
        paragraphs.append(fields)
    return paragraphs


@pytest.mark.parametrize("package", ["gpu-agent", "gpu-agent-tray"])
def test_each_package_names_the_licence_of_everything_it_bundles(debs: Debs, package: str) -> None:
    header, project, *bundled = _dep5(
        (debs.root / f"usr/share/doc/{package}/copyright").read_text()
    )
    assert header["Format"] == "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
    assert (project["Files"], project["License"].split("\n")[0]) == ("*", "Apache-2.0")
    # Every distribution in the package's part of the venv, and nothing else.
    listing = _paths(debs.service if package == "gpu-agent" else debs.tray)
    site = f"/opt/gpu-agent/venv/lib/{PYTHON}/site-packages/"
    dist_infos = {
        path.removeprefix(site).split("/")[0]
        for path in listing
        if path.startswith(site) and ".dist-info/" in path
    } - {f"gpu_provider_agent-{__version__}.dist-info"}
    named = {
        pattern.removeprefix(site.lstrip("/")).removesuffix("/*")
        for paragraph in bundled
        for pattern in paragraph["Files"].split()
    }
    assert dist_infos
    assert dist_infos <= named
    for paragraph in bundled:
        licence, *text = paragraph["License"].split("\n")
        assert licence not in ("", "unknown"), paragraph["Comment"]
        assert text, paragraph["Comment"]
        assert paragraph["Copyright"]
    licences = {p["Comment"].split()[0]: p["License"].split("\n")[0] for p in bundled}
    if package == "gpu-agent":
        assert licences["cryptography"] == "Apache-2.0 or BSD-3-Clause"
        assert licences["nvidia-ml-py"] == "BSD"  # from its classifier; text from pynvml.py
    else:
        assert set(licences) == {"PySide6_Essentials", "shiboken6"}


@pytest.mark.parametrize("package", ["gpu-agent", "gpu-agent-tray"])
def test_each_package_has_a_debian_changelog_compressed_as_gzip_9n(
    debs: Debs, package: str
) -> None:
    data = (debs.root / f"usr/share/doc/{package}/changelog.Debian.gz").read_bytes()
    # gzip -9n: no file name (FLG 0), no time stamp, maximum compression (XFL 2).
    assert (data[:4], data[4:8], data[8]) == (b"\x1f\x8b\x08\x00", b"\0\0\0\0", 2)
    lines = gzip.decompress(data).decode().splitlines()
    assert lines[0] == f"{package} ({VERSION}) unstable; urgency=medium"
    assert re.fullmatch(r" -- gpu-agent maintainers <.+>  \w{3}, \d\d \w{3} \d{4} .+", lines[-1])


def test_lintian_finds_nothing_but_what_is_explained(debs: Debs) -> None:
    # Not among CI's tools (.ci/run): checked where it is installed (apt-get install lintian).
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (apt-get install lintian)")
    shown = subprocess.run(
        ["lintian", "--tag-display-limit", "0", str(debs.service), str(debs.tray)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    tags = {
        " ".join(line.split()[:3])
        for line in shown.stdout.splitlines()
        if re.match(r"[EWIP]: ", line)
    }
    # Every tag left is overridden, with its reason, in packaging/*.lintian-overrides.
    assert tags == set(), shown.stdout
    assert "no-copyright-file" not in shown.stdout  # what the override files do not hide


def test_the_manual_page_names_every_command(debs: Debs) -> None:
    manual = gzip.decompress((debs.root / "usr/share/man/man1/gpu-agent.1.gz").read_bytes())
    listed = re.findall(r"^\.TP\n\.B (\S+)$", manual.decode(), re.MULTILINE)
    commands = next(action.choices for action in cli._parser()._actions if action.dest == "command")
    assert isinstance(commands, dict)
    assert [*listed[: len(commands)]] == list(commands)
    assert (debs.root / "usr/share/man/man1/gpu-agent-tray.1.gz").is_file()


def test_execstart_is_the_venvs_gpu_agent_script(debs: Debs) -> None:
    script = debs.root / EXEC_START.lstrip("/")
    assert os.access(script, os.X_OK)
    assert script.read_text().splitlines()[0] == "#!/opt/gpu-agent/venv/bin/python"
    assert os.readlink(debs.root / "usr/bin/gpu-agent") == EXEC_START
    venv = debs.root / "opt/gpu-agent/venv"
    assert os.readlink(venv / f"bin/{PYTHON}") == BASE_PYTHON


def test_the_venv_holds_exactly_the_locked_distributions(debs: Debs) -> None:
    site = debs.root / f"opt/gpu-agent/venv/lib/{PYTHON}/site-packages"
    named = [
        info.name.removesuffix(".dist-info").split("-", 1) for info in site.glob("*.dist-info")
    ]
    installed = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in named}
    locked = {}
    for lock in ("requirements.txt", "requirements-tray.txt"):
        pins = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", (ROOT / lock).read_text(), re.M)
        locked.update({re.sub(r"[-_.]+", "-", n).lower(): v for n, v in pins})
    assert installed == {**locked, "gpu-provider-agent": __version__}


def test_the_venv_runs_the_agent_with_its_own_dependencies(debs: Debs) -> None:
    venv = debs.root / "opt/gpu-agent/venv"
    result = subprocess.run(
        [str(venv / "bin/python"), "-I", str(venv / "bin/gpu-agent"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == f"gpu-agent {__version__}"
    imports = (
        "import agent.config.settings, agent.daemon.main, agent.daemon.systemd,"
        " coordinator.cli, platformdirs"
    )
    subprocess.run([str(venv / "bin/python"), "-I", "-c", imports], check=True, timeout=60)


def test_the_venv_runs_the_tray_with_its_own_qt(debs: Debs, tmp_path: Path) -> None:
    venv = debs.root / "opt/gpu-agent/venv"
    assert os.readlink(debs.root / "usr/bin/gpu-agent-tray") == TRAY_EXEC_START
    script = debs.root / TRAY_EXEC_START.lstrip("/")
    assert script.read_text().splitlines()[0] == "#!/opt/gpu-agent/venv/bin/python"
    draw = (
        "from PySide6.QtWidgets import QApplication; app = QApplication([]); "
        "from agent.tray.app import Tray; from agent.tray import icons; "
        "print(icons.pixmap('busy', 22).width())"
    )
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(tmp_path)}
    tmp_path.chmod(0o700)
    result = subprocess.run(
        [str(venv / "bin/python"), "-I", "-c", draw],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    assert result.stdout.strip() == "22"


def test_nothing_in_the_packages_names_where_they_were_built(debs: Debs) -> None:
    venv = debs.root / "opt/gpu-agent/venv"
    assert "/opt/gpu-agent/venv" in (venv / "pyvenv.cfg").read_text()
    staged = [
        path
        for path in venv.rglob("*")
        if path.is_file() and not path.is_symlink() and b"gpu-agent-deb-" in path.read_bytes()
    ]
    assert staged == []
    tag = f"cpython-{PYTHON.removeprefix('python').replace('.', '')}"
    cached = venv / f"lib/{PYTHON}/site-packages/agent/config/__pycache__/settings.{tag}.pyc"
    data = cached.read_bytes()
    assert int.from_bytes(data[4:8], "little") == 1  # hash-based, never checked: never rewritten
    source = f"/opt/gpu-agent/venv/lib/{PYTHON}/site-packages/agent/config/settings.py"
    assert marshal.loads(data[16:]).co_filename == source


def test_only_what_can_run_is_executable(debs: Debs) -> None:
    site = debs.root / f"opt/gpu-agent/venv/lib/{PYTHON}/site-packages"
    executable = [
        path.relative_to(site)
        for path in site.rglob("*")
        if path.is_file() and path.stat().st_mode & 0o111
    ]
    assert [path for path in executable if ".so" in path.suffixes] == []
    for path in executable:
        head = (site / path).read_bytes()[:4]
        assert head == b"\x7fELF" or head.startswith(b"#!"), path


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
    site=$(echo /opt/gpu-agent/venv/lib/python3*/site-packages)
    echo "headless=$(ls $site | grep -ci -e pyside -e shiboken)"
    echo "system=$(runuser -u gpu-agent -- /opt/gpu-agent/venv/bin/python -c "
from agent.config.settings import is_system_install; print(is_system_install())")"
    dpkg -i /tmp/gpu-agent-tray.deb >/dev/null
    mkdir -m 700 /tmp/run
    echo "tray=$(XDG_RUNTIME_DIR=/tmp/run systemd-analyze --user verify --man=no \
        gpu-agent-tray.service 2>&1; echo rc $?)"
    echo "qt=$(QT_QPA_PLATFORM=offscreen /opt/gpu-agent/venv/bin/python -c "
from PySide6.QtWidgets import QApplication; print(type(QApplication([])).__name__)")"
    dpkg -r gpu-agent-tray >/dev/null
    echo "tray_removed=$(ls $site | grep -ci -e pyside -e shiboken)"
    echo "autostart=$(ls /etc/xdg/autostart | grep -c gpu-agent)"
    dpkg -P gpu-agent-tray >/dev/null
    echo "autostart_purged=$(ls /etc/xdg/autostart | grep -c gpu-agent)"
    dpkg -r gpu-agent >/dev/null
    echo "removed=$(ls /opt/gpu-agent 2>/dev/null | wc -l) $(ls /etc/gpu-agent)"
    dpkg -P gpu-agent >/dev/null
    echo "purged=$(ls /etc/gpu-agent 2>/dev/null | wc -l)"
' sh "$4"
"""


@pytest.mark.parametrize("sysusers", ["sysusers", "no-sysusers"])
def test_the_packages_install_run_and_remove_cleanly(
    debs: Debs, tmp_path: Path, sysusers: str
) -> None:
    # dpkg -i for real, in a private mount namespace over an overlay of this machine's
    # root: the maintainer scripts run, the venv runs from its real path, and the units
    # are verified with their real ExecStart=; this machine itself is left untouched.
    # Without systemd-sysusers (a container), postinst makes the same user with useradd.
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for an overlay of /")
    for name in ("upper", "work", "merged"):
        (tmp_path / name).mkdir()
    namespace = ["unshare", "--mount", "--propagation", "private"]
    script = [str(tmp_path), str(debs.service), str(debs.tray), sysusers]
    result = subprocess.run(
        [*namespace, "sh", "-c", _INSTALL, "sh", *script],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode == 90:
        pytest.skip(f"cannot mount an overlay of / here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    said = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert said.pop("groups").split() == ["gpu-agent", "docker", "video", "render"]
    assert said == {
        "user": "/var/lib/gpu-agent:/usr/sbin/nologin",
        "verify": "rc 0",
        "version": f"gpu-agent {__version__}",
        "headless": "0",  # gpu-agent alone brings no Qt
        "system": "True",
        "tray": "rc 0",
        "qt": "QApplication",
        "tray_removed": "0",
        "autostart": "1",  # a removed package keeps its conffiles...
        "autostart_purged": "0",  # ...until it is purged
        "removed": "0 agent.toml",
        "purged": "0",
    }
