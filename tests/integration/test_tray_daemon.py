"""The tray against the real daemon: ``gpu-agent run`` as a child process on a fake NVML,
the reference coordinator in this process (in a thread: Qt has this one), the tray
offscreen. The menu and the settings window act on the real daemon; a guard tripped from
the settings window preempts a real job on the Docker engine, and the tray says so."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pytestqt.qtbot import QtBot
from support.control_target import short_dir
from support.engine import TEST_IMAGE
from support.paths import XML
from support.processes import free_port
from support.tray_daemon import CoordinatorThread

from agent.control.client import START_FIX, ControlClient
from agent.control.wire import StatusView
from agent.owner.policy import OwnerPolicy
from agent.tray.notices import Notice

os.environ["QT_QPA_PLATFORM"] = "offscreen"


from support.tray_helpers import open_tray

from agent.tray.app import Tray

WAIT_MS = 60_000
DUAL_A5000 = XML / "dual_a5000-v13.xml"  # both GPUs at 13 °C


@dataclass
class Machine:
    """The coordinator, the agent daemon and where they keep things."""

    workdir: Path
    runtime: Path
    library: Path
    coordinator: CoordinatorThread
    image: str = TEST_IMAGE  # may run if the engine has it (the test_image fixture)
    agent: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.runtime / "agent.sock"

    def start_agent(self) -> None:
        policy = self.workdir / "policy.toml"
        # Offers name an image by its id (never a tag): the id too, if the engine has it.
        inspect = ["docker", "image", "inspect", "--format", "{{.Id}}", self.image]
        found = subprocess.run(inspect, capture_output=True, text=True, check=False)
        allowed = [self.image.split(":", maxsplit=1)[0], *found.stdout.split()]
        policy.write_text(f"allowed_images = {allowed!r}\n".replace("'", '"'))
        c = self.coordinator.coordinator
        argv = [
            sys.executable, "-m", "agent.cli", "run",
            "--coordinator", c.url, "--coordinator-key", c.key.public_key_b64,
            "--state-dir", str(self.workdir / "agent"), "--policy", str(policy),
            "--runtime-dir", str(self.runtime), "--interval", "0.2",
        ]  # fmt: skip
        env = {**os.environ, "GPU_AGENT_NVML_LIB": str(self.library)}
        with (self.workdir / "agent.log").open("ab") as log:
            self.agent = subprocess.Popen(argv, env=env, stdout=log, stderr=log)

    def stop_agent(self) -> None:
        assert self.agent is not None
        self.agent.send_signal(signal.SIGTERM)
        assert self.agent.wait(60) == 0

    def ask(self, what: Callable[[ControlClient], object]) -> object:
        """Ask the daemon something on a connection of the test's own."""

        async def call() -> object:
            async with await ControlClient.connect(self.socket) as client:
                return await what(client)  # type: ignore[misc]

        return asyncio.run(call())


@pytest.fixture
def machine(tmp_path: Path, library_for: Callable[[Path], Path]) -> Iterator[Machine]:
    with short_dir() as runtime:
        coordinator = CoordinatorThread(tmp_path, free_port())
        world = Machine(tmp_path, runtime, library_for(DUAL_A5000), coordinator)
        world.start_agent()
        try:
            yield world
        finally:
            if world.agent is not None and world.agent.poll() is None:
                world.stop_agent()
            coordinator.close()


def _tray(path: Path) -> AbstractContextManager[Tray]:
    return open_tray(path, retry_max_s=0.5)


@pytest.fixture
def tray(qtbot: QtBot, machine: Machine) -> Iterator[Tray]:
    with _tray(machine.socket) as shown:
        # The daemon starts, connects, checks its GPUs: ready for work.
        qtbot.waitUntil(lambda: _failed(machine) or tray_kind(shown) == "sharing", timeout=WAIT_MS)
        yield shown


def tray_kind(tray: Tray) -> str:
    return tray.presentation.kind


def _failed(machine: Machine) -> bool:
    if machine.agent is not None and machine.agent.poll() is not None:
        log = (machine.workdir / "agent.log").read_text()
        pytest.fail(f"the agent exited {machine.agent.returncode}:\n{log}")
    return False


def _status(tray: Tray) -> StatusView:
    assert isinstance(tray.state, StatusView)
    return tray.state


def test_the_tray_follows_and_drives_the_real_daemon(
    qtbot: QtBot, machine: Machine, tray: Tray
) -> None:
    assert "GPU 0 NVIDIA RTX A5000: 13 °C" in tray.icon.toolTip()
    assert tray.presentation.menu.dashboard == machine.coordinator.coordinator.dashboard_url

    tray.pause.trigger()
    qtbot.waitUntil(lambda: tray_kind(tray) == "paused", timeout=WAIT_MS)
    assert tray.headline.text() == "Paused"
    daemon_says = machine.ask(lambda client: client.status())
    assert isinstance(daemon_says, StatusView)
    assert (daemon_says.paused, daemon_says.paused_until) == (True, None)

    before = time.time()
    tray.pause_hour.trigger()
    qtbot.waitUntil(lambda: _status(tray).paused_until is not None, timeout=WAIT_MS)
    until = _status(tray).paused_until
    assert until is not None
    assert before + 3600 <= until <= time.time() + 3600
    assert tray.headline.text().startswith("Paused until ")

    tray.resume.trigger()
    qtbot.waitUntil(lambda: tray_kind(tray) == "sharing", timeout=WAIT_MS)

    # The check mark flips at the click; the settings the daemon answers with are what count.
    tray.idle.trigger()
    qtbot.waitUntil(lambda: _idle_setting(tray) is True, timeout=WAIT_MS)
    assert tray.idle.isChecked()
    settings = machine.ask(lambda client: client.settings())
    assert isinstance(settings, OwnerPolicy)
    assert settings.share_only_when_idle
    tray.idle.trigger()
    qtbot.waitUntil(lambda: _idle_setting(tray) is False, timeout=WAIT_MS)
    assert not tray.idle.isChecked()
    assert machine.ask(lambda client: client.settings()) == OwnerPolicy()


def _idle_setting(tray: Tray) -> bool | None:
    return None if tray.settings is None else tray.settings.share_only_when_idle


def test_the_daemon_stopping_and_starting_again(qtbot: QtBot, machine: Machine, tray: Tray) -> None:
    machine.stop_agent()
    qtbot.waitUntil(lambda: tray.fix.text() == f"Fix: {START_FIX}", timeout=WAIT_MS)
    assert (tray_kind(tray), tray.headline.text()) == ("error", "Agent not running")
    assert not tray.pause.isEnabled()

    machine.start_agent()
    qtbot.waitUntil(lambda: _failed(machine) or tray_kind(tray) == "sharing", timeout=WAIT_MS)
    assert not tray.fix.isVisible()
    assert tray.pause.isEnabled()


def test_a_guard_set_in_the_settings_window_preempts_the_running_job(
    qtbot: QtBot, machine: Machine, tray: Tray, test_image_id: str
) -> None:
    told: list[Notice] = []
    tray.noticed.connect(told.append)

    spec = {"image": test_image_id, "command": ["sleep", "300"], "timeout_s": 120, "grace_s": 2}
    job_id = machine.coordinator.submit(_status(tray).node_id, spec)
    qtbot.waitUntil(lambda: tray_kind(tray) == "busy", timeout=WAIT_MS)
    assert f"Current job: {job_id}" in tray.icon.toolTip()

    tray.open_settings.trigger()
    window = tray.settings_window
    assert window is not None
    qtbot.waitUntil(window.save_button.isEnabled, timeout=WAIT_MS)
    window.pause_above.setValue(10)  # the GPUs are at 13 °C
    window.resume_below.setValue(5)
    window.save()
    qtbot.waitUntil(lambda: window.message.text() == "Saved.", timeout=WAIT_MS)

    qtbot.waitUntil(lambda: any(n.title.startswith("Job") for n in told), timeout=WAIT_MS)
    [notice] = [n for n in told if n.title.startswith("Job")]
    assert notice.title == f"Job {job_id} was preempted"
    assert "above 10 °C" in notice.text
    assert (tray_kind(tray), tray.headline.text()) == ("paused", "Paused: a GPU is too hot")
    qtbot.waitUntil(lambda: machine.coordinator.job_state(job_id) == "preempted", timeout=WAIT_MS)
