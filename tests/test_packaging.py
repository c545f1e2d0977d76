"""The systemd unit, the sysusers file and the .deb, checked with the tools that use them;
and the tray's systemd user unit and desktop entry.

``systemd-analyze verify`` needs the unit's ``ExecStart=`` binary to exist, and
``/opt/gpu-agent/venv/bin/gpu-agent`` exists only once the package is installed. So the
unit is verified as shipped except for that one path, pointed at a stand-in executable,
and the package test checks that the real path is in the package, executable and
runnable. The .deb is built once per session by ``scripts/build_deb.py``, as ``make deb``
does (a few seconds with pip's cache warm).
"""

from __future__ import annotations

import marshal
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hal import __version__
from sandbox.policy import Policy

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "gpu-agent.service"
EXEC_START = "/opt/gpu-agent/venv/bin/gpu-agent"
TRAY_UNIT = PACKAGING / "gpu-agent-tray.service"
TRAY_DESKTOP = PACKAGING / "gpu-agent-tray.desktop"
TRAY_EXEC_START = "/opt/gpu-agent/venv/bin/gpu-agent-tray"
BASE_PYTHON = "/usr/bin/python3.11"


def _require(*tools: str) -> None:
    """Skip where a tool is missing; in CI, fail: the check must not go quietly."""
    missing = [t for t in tools if not (shutil.which(t) or Path(t).exists())]
    if missing:
        message = f"missing here: {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    stand_in = tmp_path / "gpu-agent"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "gpu-agent.service"
    unit.write_text(unit_text.replace(EXEC_START, str(stand_in)))
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _setting(name: str) -> str:
    found = re.findall(rf"^{name}=(.*)$", UNIT.read_text(), re.MULTILINE)
    assert len(found) == 1, f"{name}= is set {len(found)} times"
    return str(found[0])


# The unit


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    _require("systemd-analyze")
    assert _setting("ExecStart").startswith(f"{EXEC_START} run --config ")
    result = _verify(UNIT.read_text(), tmp_path)
    # verify reports a bad key or value only as a warning on stderr, and still exits 0.
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (("Type=notify", "Typ=notify"), "Unknown key"),
        (("KillMode=mixed", "KillMode=gently"), "kill mode"),
        (("DeviceAllow=char-drm rw", "DeviceAllow=char-drm rwx"), "device rights"),
    ],
)
def test_verify_as_run_here_catches_a_broken_unit(
    tmp_path: Path, change: tuple[str, str], complaint: str
) -> None:
    _require("systemd-analyze")
    text = UNIT.read_text()
    assert change[0] in text
    result = _verify(text.replace(change[0], change[1]), tmp_path)
    assert complaint in result.stderr


def test_the_unit_runs_the_agent_from_its_venv_with_the_system_config() -> None:
    assert _setting("ExecStart") == f"{EXEC_START} run --config /etc/gpu-agent/agent.toml"
    assert (_setting("Type"), _setting("NotifyAccess")) == ("notify", "main")
    assert (_setting("User"), _setting("Group")) == ("gpu-agent", "gpu-agent")
    assert _setting("SupplementaryGroups").split() == ["docker", "video", "render"]
    assert (_setting("StateDirectory"), _setting("RuntimeDirectory")) == ("gpu-agent",) * 2
    assert _setting("RuntimeDirectoryMode") == "0750"


def test_the_stop_timeout_leaves_room_for_the_longest_grace_period() -> None:
    stop = _setting("TimeoutStopSec")
    assert stop.endswith("s")
    # Jobs' grace, then reporting them and flushing the outbox, before systemd's SIGKILL.
    assert float(stop.removesuffix("s")) >= Policy().max_grace_s + 20
    assert _setting("KillMode") == "mixed"


def test_the_sysusers_file_makes_the_user_and_every_group_the_unit_needs(tmp_path: Path) -> None:
    _require("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(PACKAGING / "gpu-agent.sysusers")],
        capture_output=True,
        check=True,
        timeout=60,
    )
    passwd = (tmp_path / "etc/passwd").read_text().splitlines()
    users = {line.split(":")[0]: line.split(":") for line in passwd}
    assert users["gpu-agent"][5] == "/var/lib/gpu-agent"
    assert users["gpu-agent"][6].endswith("nologin")
    groups = {line.split(":")[0] for line in (tmp_path / "etc/group").read_text().splitlines()}
    assert groups >= {"gpu-agent", *_setting("SupplementaryGroups").split()}


# The tray's user unit and desktop entry


def _verify_user_unit(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    stand_in = tmp_path / "gpu-agent-tray"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "gpu-agent-tray.service"
    unit.write_text(unit_text.replace(TRAY_EXEC_START, str(stand_in)))
    runtime = tmp_path / "run"  # a user manager needs one, even to verify
    runtime.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(
        ["systemd-analyze", "--user", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )


def test_the_tray_user_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    _require("systemd-analyze")
    text = TRAY_UNIT.read_text()
    assert re.findall(r"^ExecStart=(.*)$", text, re.MULTILINE) == [TRAY_EXEC_START]
    result = _verify_user_unit(text, tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    broken = _verify_user_unit(text.replace("Restart=on-failure", "Restart=sometimes"), tmp_path)
    assert "restart specifier" in broken.stderr


def test_the_tray_runs_with_the_graphical_session() -> None:
    text = TRAY_UNIT.read_text()
    for line in (
        "PartOf=graphical-session.target",
        "After=graphical-session.target",
        "WantedBy=graphical-session.target",
        "Restart=on-failure",  # not after "Quit", which exits 0
    ):
        assert line in text.splitlines()


def test_the_tray_desktop_entry_starts_the_tray_at_login() -> None:
    lines = TRAY_DESKTOP.read_text().splitlines()
    assert lines[0] == "[Desktop Entry]"
    entry = dict(line.split("=", 1) for line in lines[1:] if line and not line.startswith("#"))
    assert (entry["Type"], entry["Exec"], entry["Icon"], entry["Terminal"]) == (
        "Application",
        "gpu-agent-tray",
        "gpu-agent-tray",
        "false",
    )
    assert entry["X-GNOME-Autostart-enabled"] == "true"
    assert entry["Categories"].endswith(";")


def test_the_tray_desktop_entry_passes_desktop_file_validate() -> None:
    # desktop-file-utils is not among CI's tools (.ci/run): checked where it is installed.
    if shutil.which("desktop-file-validate") is None:
        pytest.skip("desktop-file-validate is not installed (apt-get install desktop-file-utils)")
    result = subprocess.run(
        ["desktop-file-validate", str(TRAY_DESKTOP)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


# The package


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package, built as `make deb` builds it."""
    _require("dpkg-deb", BASE_PYTHON)
    out = tmp_path_factory.mktemp("deb")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/build_deb.py"), "--out", str(out)],
        capture_output=True,
        check=True,
        timeout=300,
    )
    (package,) = out.glob("*.deb")
    return package


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's files, under a root of their own."""
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=60)
    return root


def _dpkg_deb(*args: str) -> str:
    return subprocess.run(
        ["dpkg-deb", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def test_the_package_says_what_it_is_and_needs(deb: Path) -> None:
    fields = dict(
        line.split(": ", 1)
        for line in _dpkg_deb("-f", str(deb), "Package", "Version", "Depends").splitlines()
    )
    assert fields == {"Package": "gpu-agent", "Version": __version__, "Depends": "python3.11"}


def test_the_package_installs_the_unit_the_sysusers_file_and_the_config(
    deb: Path, unpacked: Path
) -> None:
    listing = _dpkg_deb("-c", str(deb))
    for path in (
        "./usr/lib/systemd/system/gpu-agent.service",
        "./usr/lib/sysusers.d/gpu-agent.conf",
        "./etc/gpu-agent/agent.toml",
        "./usr/share/doc/gpu-agent/configuration.md",
        "./usr/lib/systemd/user/gpu-agent-tray.service",
        "./usr/share/applications/gpu-agent-tray.desktop",
        "./etc/xdg/autostart/gpu-agent-tray.desktop",
        "./usr/share/icons/hicolor/scalable/apps/gpu-agent-tray.svg",
    ):
        assert path in listing
    for shipped, source in (
        ("usr/lib/systemd/system/gpu-agent.service", "gpu-agent.service"),
        ("usr/lib/sysusers.d/gpu-agent.conf", "gpu-agent.sysusers"),
        ("etc/gpu-agent/agent.toml", "agent.toml"),
        ("usr/lib/systemd/user/gpu-agent-tray.service", "gpu-agent-tray.service"),
        ("usr/share/applications/gpu-agent-tray.desktop", "gpu-agent-tray.desktop"),
        ("etc/xdg/autostart/gpu-agent-tray.desktop", "gpu-agent-tray.desktop"),
        ("usr/share/icons/hicolor/scalable/apps/gpu-agent-tray.svg", "gpu-agent-tray.svg"),
    ):
        assert (unpacked / shipped).read_bytes() == (PACKAGING / source).read_bytes()


def test_the_config_is_a_conffile_and_the_maintainer_scripts_are_there(
    deb: Path, tmp_path: Path
) -> None:
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "control")], check=True)
    control = tmp_path / "control"
    assert (control / "conffiles").read_text().split() == [
        "/etc/gpu-agent/agent.toml",
        "/etc/xdg/autostart/gpu-agent-tray.desktop",  # an admin may delete it: kept so
    ]
    for script in ("postinst", "prerm", "postrm"):
        assert os.access(control / script, os.X_OK)
    assert "systemd-sysusers" in (control / "postinst").read_text()


def test_execstart_is_the_venvs_gpu_agent_script(unpacked: Path) -> None:
    script = unpacked / EXEC_START.lstrip("/")
    assert os.access(script, os.X_OK)
    assert script.read_text().splitlines()[0] == "#!/opt/gpu-agent/venv/bin/python"
    assert os.readlink(unpacked / "usr/bin/gpu-agent") == EXEC_START
    assert os.readlink(unpacked / "opt/gpu-agent/venv/bin/python3.11") == BASE_PYTHON


def test_the_venv_runs_the_agent_with_its_own_dependencies(unpacked: Path) -> None:
    venv = unpacked / "opt/gpu-agent/venv"
    result = subprocess.run(
        [str(venv / "bin/python"), "-I", str(venv / "bin/gpu-agent"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == f"gpu-agent {__version__}"
    imports = "import agent.config, agent.daemon, agent.systemd, coordinator.cli, platformdirs"
    subprocess.run([str(venv / "bin/python"), "-I", "-c", imports], check=True, timeout=60)


def test_the_venv_runs_the_tray_with_its_own_qt(unpacked: Path, tmp_path: Path) -> None:
    venv = unpacked / "opt/gpu-agent/venv"
    assert os.readlink(unpacked / "usr/bin/gpu-agent-tray") == TRAY_EXEC_START
    script = unpacked / TRAY_EXEC_START.lstrip("/")
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


def test_nothing_in_the_package_names_where_it_was_built(unpacked: Path) -> None:
    venv = unpacked / "opt/gpu-agent/venv"
    assert "/opt/gpu-agent/venv" in (venv / "pyvenv.cfg").read_text()
    staged = [
        path
        for path in venv.rglob("*")
        if path.is_file() and not path.is_symlink() and b"gpu-agent-deb-" in path.read_bytes()
    ]
    assert staged == []
    cached = venv / "lib/python3.11/site-packages/agent/__pycache__/config.cpython-311.pyc"
    data = cached.read_bytes()
    assert int.from_bytes(data[4:8], "little") == 1  # hash-based, never checked: never rewritten
    source = "/opt/gpu-agent/venv/lib/python3.11/site-packages/agent/config.py"
    assert marshal.loads(data[16:]).co_filename == source


# The package installed, in a throwaway copy of this machine

_INSTALL = r"""
set -e
root=$1/merged
mount -t overlay overlay -o "lowerdir=/,upperdir=$1/upper,workdir=$1/work" "$root" || exit 90
for fs in proc dev sys; do mount --rbind "/$fs" "$root/$fs"; done
mount -t tmpfs tmpfs "$root/tmp"
cp "$2" "$root/tmp/gpu-agent.deb"
exec chroot "$root" sh -c '
    dpkg -i /tmp/gpu-agent.deb >/dev/null
    echo "user=$(getent passwd gpu-agent | cut -d: -f6,7)"
    echo "verify=$(systemd-analyze verify --man=no gpu-agent.service 2>&1; echo rc $?)"
    echo "version=$(gpu-agent --version)"
    mkdir -m 700 /tmp/run
    echo "tray=$(XDG_RUNTIME_DIR=/tmp/run systemd-analyze --user verify --man=no \
        gpu-agent-tray.service 2>&1; echo rc $?)"
    echo "system=$(runuser -u gpu-agent -- /opt/gpu-agent/venv/bin/python -c "
from agent.config import is_system_install; print(is_system_install())")"
    dpkg -r gpu-agent >/dev/null
    echo "removed=$(ls /opt/gpu-agent 2>/dev/null | wc -l) $(ls /etc/gpu-agent)"
    echo "autostart=$(ls /etc/xdg/autostart | grep -c gpu-agent)"
    dpkg -P gpu-agent >/dev/null
    echo "purged=$(ls /etc/gpu-agent 2>/dev/null | wc -l)"
    echo "autostart_purged=$(ls /etc/xdg/autostart | grep -c gpu-agent)"
'
"""


def test_the_package_installs_runs_and_removes_cleanly(deb: Path, tmp_path: Path) -> None:
    # dpkg -i for real, in a private mount namespace over an overlay of this machine's
    # root: the maintainer scripts run, the venv runs from its real path, and the unit is
    # verified with its real ExecStart=; this machine itself is left untouched.
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for an overlay of /")
    for name in ("upper", "work", "merged"):
        (tmp_path / name).mkdir()
    namespace = ["unshare", "--mount", "--propagation", "private"]
    result = subprocess.run(
        [*namespace, "sh", "-c", _INSTALL, "sh", str(tmp_path), str(deb)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode == 90:
        pytest.skip(f"cannot mount an overlay of / here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    said = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert said == {
        "user": "/var/lib/gpu-agent:/usr/sbin/nologin",
        "verify": "rc 0",
        "version": f"gpu-agent {__version__}",
        "tray": "rc 0",
        "system": "True",
        "removed": "0 agent.toml",  # a removed package keeps its edited config...
        "autostart": "1",
        "purged": "0",  # ...until it is purged
        "autostart_purged": "0",
    }
