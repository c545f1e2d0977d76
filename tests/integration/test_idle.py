"""The owner's idle time: logind on a private bus, X11, input devices, and the chain of them.

logind is replaced by a fake service on a real ``dbus-daemon`` of the test's own; X11 by a
real Xvfb where one is installed; input devices by FIFOs and sysfs files in a tree the test
builds. The clocks are the tests' own.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from support.idle import (
    BUS_CONFIG,
    KEYBOARD_EV,
    KEYBOARD_KEYS,
    FakeLogind,
    add_input_device,
)

from agent.owner.idle.input import InputIdle, is_human_input, parse_bitmap
from agent.owner.idle.logind import LogindIdle, system_bus_address
from agent.owner.idle.monitor import IdleDetector, IdleSource
from agent.owner.idle.x11 import X11Idle, XLibraries, load_libraries
from hal.types import Unavailable


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def reason(reading: object) -> str:
    """The reason code of an unavailable reading."""
    assert isinstance(reading, Unavailable), reading
    return reading.reason


# -- logind ------------------------------------------------------------------------------


@pytest.fixture
def system_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A dbus-daemon of this test's own; its address."""
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon is not installed (Debian: dbus-daemon)")
    base = tmp_path_factory.mktemp("bus")
    config = base / "bus.conf"
    config.write_text(BUS_CONFIG.format(socket=base / "socket"), encoding="utf-8")
    daemon = subprocess.Popen(
        ["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile", "--print-address"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert daemon.stdout is not None
    address = daemon.stdout.readline().strip()  # printed once it listens
    try:
        yield address.split(",")[0]
    finally:
        daemon.terminate()
        daemon.wait()
        daemon.stdout.close()


@pytest.fixture
def logind(system_bus: str) -> Iterator[FakeLogind]:
    service = FakeLogind(system_bus)
    yield service
    service.close()


def test_idle_session_reports_the_time_since_its_monotonic_idle_hint(
    system_bus: str, logind: FakeLogind
) -> None:
    logind.log_in("2", idle=True, since_mono_us=400_000_000)
    with closing(LogindIdle(system_bus, monotonic=Clock(1000.0))) as source:
        assert source.read() == 600.0


def test_session_in_use_is_idle_for_zero_seconds(system_bus: str, logind: FakeLogind) -> None:
    logind.log_in("2", idle=False, since_mono_us=400_000_000)
    with closing(LogindIdle(system_bus, monotonic=Clock())) as source:
        assert source.read() == 0.0


def test_idle_hint_without_a_monotonic_time_uses_the_realtime_one(
    system_bus: str, logind: FakeLogind
) -> None:
    logind.log_in("2", idle=True, since_us=1_700_000_000_000_000)
    source = LogindIdle(system_bus, monotonic=Clock(), wall=lambda: 1_700_000_090.0)
    with closing(source):
        assert source.read() == 90.0


def test_the_active_session_is_asked_again_at_each_reading(
    system_bus: str, logind: FakeLogind
) -> None:
    logind.log_in("2", idle=True, since_mono_us=400_000_000)
    with closing(LogindIdle(system_bus, monotonic=Clock(1000.0))) as source:
        assert source.read() == 600.0
        logind.log_in("5", idle=False)  # someone else switched to their session
        assert source.read() == 0.0
        logind.active = ("", "/")  # back at a login screen without a greeter session
        assert reason(source.read()) == "no_active_session"


def test_one_connection_serves_every_reading(system_bus: str, logind: FakeLogind) -> None:
    logind.log_in("2", idle=False)
    with closing(LogindIdle(system_bus, monotonic=Clock())) as source:
        source.read()
        source.read()
    assert logind.calls == 1 + 2 + 2  # GetSeat once; then ActiveSession and IdleHint each time


def test_no_active_session_on_seat0_is_unavailable(system_bus: str, logind: FakeLogind) -> None:
    with closing(LogindIdle(system_bus, monotonic=Clock())) as source:
        assert reason(source.read()) == "no_active_session"


def test_a_machine_without_seat0_is_unavailable(system_bus: str) -> None:
    service = FakeLogind(system_bus, seats=())
    try:
        with closing(LogindIdle(system_bus, monotonic=Clock())) as source:
            assert reason(source.read()) == "no_seat"
    finally:
        service.close()


def test_a_bus_without_logind_is_unavailable(system_bus: str) -> None:
    with closing(LogindIdle(system_bus, monotonic=Clock())) as source:
        assert reason(source.read()) == "no_logind"


def test_no_bus_is_unavailable_and_not_retried_every_second(tmp_path: Path) -> None:
    clock = Clock(0.0)
    source = LogindIdle(f"unix:path={tmp_path}/nobody", monotonic=clock)
    first = source.read()
    assert reason(first) == "no_bus"
    # A try now would fail otherwise (connection refused, not "no such file"): none is made.
    (tmp_path / "nobody").write_text("", encoding="utf-8")
    clock.now = 10.0
    assert source.read() == first


def test_the_bus_address_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/test/bus")
    assert LogindIdle().address == "unix:path=/run/test/bus"
    monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS")
    assert system_bus_address() == "unix:path=/var/run/dbus/system_bus_socket"


# -- X11 ---------------------------------------------------------------------------------


def test_x11_without_display_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    assert reason(X11Idle().read()) == "no_display"


def test_x11_libraries_load_with_their_prototypes() -> None:
    libraries = load_libraries()
    if isinstance(libraries, Unavailable):
        pytest.skip(libraries.detail)
    assert isinstance(libraries, XLibraries)
    assert libraries.xss.XScreenSaverQueryInfo.argtypes is not None


def test_x11_display_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    clock = Clock(0.0)
    source = X11Idle(":4093", monotonic=clock)  # no server there
    first = source.read()
    assert reason(first) in ("display_unreachable", "library_missing")
    clock.now = 30.0
    assert source.read() == first  # not tried again yet


@pytest.fixture
def xvfb() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real X server, when one is installed; its display and its process."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (Debian: xvfb)")
    read, write = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-nolisten", "tcp", "-auth", os.devnull],
        pass_fds=[write],
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    with os.fdopen(read) as numbers:
        display = ":" + numbers.readline().strip()
    yield display, server
    server.terminate()
    server.wait()


def test_x11_reads_the_server_idle_time_and_survives_its_end(
    xvfb: tuple[str, subprocess.Popen[bytes]],
) -> None:
    display, server = xvfb
    source = X11Idle(display, monotonic=Clock())
    idle = source.read()
    assert isinstance(idle, float)
    assert idle >= 0.0
    server.terminate()
    server.wait()
    # Xlib would end the process here with its own handlers.
    assert reason(source.read()) == "display_lost"


# -- input devices -----------------------------------------------------------------------

MOUSE_EV, MOUSE_KEYS = "17", "70000 0 0 0 0"  # SYN KEY REL MSC; left, right, middle
LID_EV, LID_KEYS = "21", "0"  # SYN SW
POWER_EV, POWER_KEYS = "3", "10000000000000 0"  # KEY_POWER alone
ACCELEROMETER_EV, ACCELEROMETER_KEYS = "9", "0"  # SYN ABS
EV_KEY, EV_MSC = 1, 4
EVENT = struct.Struct("@llHHi")


def input_source(root: Path, clock: Clock) -> InputIdle:
    return InputIdle(
        dev_root=root / "dev", sysfs_root=root / "sys", proc_root=root / "proc", monotonic=clock
    )


def test_capability_bitmaps_tell_people_from_switches_and_sensors() -> None:
    def human(ev: str, keys: str) -> bool:
        return is_human_input(parse_bitmap(ev), parse_bitmap(keys))

    assert human(KEYBOARD_EV, KEYBOARD_KEYS)
    assert human(MOUSE_EV, MOUSE_KEYS)
    assert not human(LID_EV, LID_KEYS)
    assert not human(POWER_EV, POWER_KEYS)
    assert not human(ACCELEROMETER_EV, ACCELEROMETER_KEYS)
    assert parse_bitmap(POWER_KEYS) == 1 << 116  # KEY_POWER, in the second long


def test_key_events_reset_the_idle_time_and_others_do_not(tmp_path: Path) -> None:
    keyboard = add_input_device(tmp_path, "event3", KEYBOARD_EV, KEYBOARD_KEYS)
    clock = Clock(100.0)
    source = input_source(tmp_path, clock)
    assert source.read() == 0.0  # watching starts now: a lower bound
    writer = os.open(keyboard, os.O_WRONLY | os.O_NONBLOCK)  # the source holds the reader
    try:
        clock.now = 130.0
        assert source.read() == 30.0
        os.write(writer, EVENT.pack(0, 0, EV_MSC, 4, 458756))  # a scan code alone
        clock.now = 140.0
        assert source.read() == 40.0
        os.write(writer, EVENT.pack(0, 0, EV_MSC, 4, 458756) + EVENT.pack(0, 0, EV_KEY, 30, 1))
        clock.now = 150.0
        assert source.read() == 0.0
        clock.now = 160.0
        assert source.read() == 10.0
    finally:
        os.close(writer)
        source.close()


def test_switches_and_buttons_are_not_opened(tmp_path: Path) -> None:
    add_input_device(tmp_path, "event0", LID_EV, LID_KEYS)
    add_input_device(tmp_path, "event1", POWER_EV, POWER_KEYS)
    source = input_source(tmp_path, Clock())
    assert reason(source.read()) == "no_input_source"
    for name in ("event0", "event1"):
        # A FIFO that nobody reads cannot be opened for writing: ENXIO.
        with pytest.raises(OSError, match="No such device or address"):
            os.open(tmp_path / "dev" / "input" / name, os.O_WRONLY | os.O_NONBLOCK)


def test_a_device_plugged_in_later_is_watched(tmp_path: Path) -> None:
    (tmp_path / "dev" / "input").mkdir(parents=True)
    interrupts = tmp_path / "proc" / "interrupts"
    interrupts.parent.mkdir()
    interrupts.write_text("           CPU0\n  1:  9  IO-APIC  1-edge  i8042\n", encoding="ascii")
    clock = Clock(0.0)
    source = input_source(tmp_path, clock)
    assert source.read() == 0.0  # from the i8042 count
    mouse = add_input_device(tmp_path, "event7", MOUSE_EV, MOUSE_KEYS)
    clock.now = 5.0
    assert source.read() == 5.0
    writer = os.open(mouse, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(writer, EVENT.pack(0, 0, 2, 0, -3))  # REL_X
        clock.now = 6.0
        assert source.read() == 0.0
    finally:
        os.close(writer)
        source.close()


I8042 = """           CPU0       CPU1
  1:       {keyboard}          0   IO-APIC    1-edge      i8042
  8:          0          0   IO-APIC    8-edge      rtc0
 12:          0       {mouse}   IO-APIC   12-edge      i8042
 16:       5000       9000   IO-APIC   16-fasteoi   xhci_hcd, i801_smbus
NMI:          0          0   Non-maskable interrupts
"""


def test_without_readable_devices_the_i8042_interrupt_count_tells_input(tmp_path: Path) -> None:
    interrupts = tmp_path / "proc" / "interrupts"
    interrupts.parent.mkdir()
    interrupts.write_text(I8042.format(keyboard=100, mouse=7), encoding="ascii")
    clock = Clock(0.0)
    source = input_source(tmp_path, clock)
    assert source.read() == 0.0
    clock.now = 20.0
    assert source.read() == 20.0
    interrupts.write_text(I8042.format(keyboard=100, mouse=9), encoding="ascii")  # the touchpad
    clock.now = 25.0
    assert source.read() == 0.0
    interrupts.write_text(  # USB traffic is not input
        I8042.format(keyboard=100, mouse=9).replace("5000", "6000"), encoding="ascii"
    )
    clock.now = 26.0
    assert source.read() == 1.0


def test_no_devices_and_no_i8042_is_unavailable_with_both_reasons(tmp_path: Path) -> None:
    interrupts = tmp_path / "proc" / "interrupts"
    interrupts.parent.mkdir()
    interrupts.write_text("           CPU0\n 16:  5000  IO-APIC  16-fasteoi  xhci_hcd\n")
    reading = input_source(tmp_path, Clock()).read()
    assert isinstance(reading, Unavailable)
    assert reading.reason == "no_input_source"
    assert "no human input device" in reading.detail
    assert "no i8042" in reading.detail


# -- the detector ------------------------------------------------------------------------


def test_the_first_source_that_can_tell_answers(tmp_path: Path) -> None:
    interrupts = tmp_path / "proc" / "interrupts"
    interrupts.parent.mkdir()
    interrupts.write_text(I8042.format(keyboard=1, mouse=1), encoding="ascii")
    clock = Clock(50.0)
    detector = IdleDetector(
        [
            LogindIdle(f"unix:path={tmp_path}/no-bus", monotonic=clock),
            X11Idle("", monotonic=clock),
            input_source(tmp_path, clock),
        ]
    )
    assert detector.idle_seconds() == 0.0
    clock.now = 80.0
    assert detector.idle_seconds() == 30.0
    assert detector.source == "input"
    assert {name: r.reason for name, r in detector.reasons().items()} == {
        "logind": "no_bus",
        "x11": "no_display",
    }


def test_logind_answers_before_the_others(
    tmp_path: Path, system_bus: str, logind: FakeLogind
) -> None:
    logind.log_in("2", idle=True, since_mono_us=400_000_000)
    clock = Clock(1000.0)
    sources: list[IdleSource] = [
        LogindIdle(system_bus, monotonic=clock),
        input_source(tmp_path, clock),
    ]
    with closing(IdleDetector(sources)) as detector:
        assert detector.idle_seconds() == 600.0
        assert detector.source == "logind"
        assert detector.reasons() == {}


def test_no_source_that_can_tell_gives_none_and_logs_each_reason_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    detector = IdleDetector(
        [LogindIdle(f"unix:path={tmp_path}/no-bus", monotonic=clock), input_source(tmp_path, clock)]
    )
    with caplog.at_level(logging.DEBUG, logger="agent.owner.idle.monitor"):
        assert detector.idle_seconds() is None
        assert detector.idle_seconds() is None
    assert detector.source is None
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "idle time from logind",
        "idle time from input",
    ]
