"""The systemd unit and the sysusers file, checked with the tools that use them; and the
tray's systemd user unit and desktop entry. The packages are tests/integration/test_deb.py's.

``systemd-analyze verify`` needs the unit's ``ExecStart=`` and ``ExecStartPre=`` binaries
to exist, and ``/opt/gpu-agent/venv/bin/gpu-agent`` and ``/usr/lib/gpu-agent/make-venv``
exist only once the package is installed. So the unit is verified as shipped except for
those paths, pointed at a stand-in executable, and the package tests check that the real
ones are made by the package, executable and runnable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support.packaging import EXEC_START, MAKE_VENV, PACKAGING, TRAY_EXEC_START, require_tool

from sandbox.policy import Policy

UNIT = PACKAGING / "gpu-agent.service"
TRAY_UNIT = PACKAGING / "gpu-agent-tray.service"
TRAY_DESKTOP = PACKAGING / "gpu-agent-tray.desktop"


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    stand_in = tmp_path / "gpu-agent"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "gpu-agent.service"
    unit.write_text(unit_text.replace(EXEC_START, str(stand_in)).replace(MAKE_VENV, str(stand_in)))
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
    require_tool("systemd-analyze")
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
    require_tool("systemd-analyze")
    text = UNIT.read_text()
    assert change[0] in text
    result = _verify(text.replace(change[0], change[1]), tmp_path)
    assert complaint in result.stderr


def test_the_unit_runs_the_agent_from_its_venv_with_the_system_config() -> None:
    assert _setting("ExecStart") == f"{EXEC_START} run --config /etc/gpu-agent/agent.toml"
    # The venv remade first, as root, if python3 or the package changed since.
    assert _setting("ExecStartPre") == f"+{MAKE_VENV}"
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
    require_tool("systemd-sysusers")
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
    require_tool("systemd-analyze")
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
