"""The cost of one idle-time reading, per source.

Run with ``python bench/idle.py``: logind is the tests' fake service on a private
``dbus-daemon``, served from another process so that only the reader's CPU is counted;
the input source drains a FIFO standing in for an event node; X11 reads a real Xvfb where
one is installed. Nothing here is asserted.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from support.idle import (  # noqa: E402
    BUS_CONFIG,
    KEYBOARD_EV,
    KEYBOARD_KEYS,
    FakeLogind,
    add_input_device,
)

from agent.owner.idle.input import InputIdle  # noqa: E402
from agent.owner.idle.logind import LogindIdle  # noqa: E402
from agent.owner.idle.x11 import X11Idle  # noqa: E402

READINGS = 2000


def _serve_logind(
    address: str, ready: multiprocessing.synchronize.Event, stop: multiprocessing.synchronize.Event
) -> None:
    service = FakeLogind(address)
    service.log_in("2", idle=True, since_mono_us=1)
    ready.set()
    stop.wait()
    service.close()


def _time(read: Callable[[], object]) -> float:
    """Microseconds of CPU per reading."""
    read()
    started = time.process_time()
    for _ in range(READINGS):
        read()
    return (time.process_time() - started) / READINGS * 1e6


def main() -> None:
    """Time each source and print the figures."""
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        config = base / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=base / "socket"), encoding="utf-8")
        daemon = subprocess.Popen(
            ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert daemon.stdout is not None
        address = daemon.stdout.readline().strip().split(",")[0]
        ready, stop = multiprocessing.Event(), multiprocessing.Event()
        server = multiprocessing.Process(target=_serve_logind, args=(address, ready, stop))
        server.start()
        ready.wait()
        try:
            logind = LogindIdle(address)
            wall = time.perf_counter()
            cpu = _time(logind.read)
            wall_us = (time.perf_counter() - wall) / (READINGS + 1) * 1e6
            print(f"logind (idle session, 3 calls): {cpu:.0f} us CPU, {wall_us:.0f} us wall")
            logind.close()
        finally:
            stop.set()
            server.join()
            daemon.terminate()
            daemon.wait()
            daemon.stdout.close()

        node = add_input_device(base, "event0", KEYBOARD_EV, KEYBOARD_KEYS)
        source = InputIdle(dev_root=base / "dev", sysfs_root=base / "sys", proc_root=base / "proc")
        source.read()
        writer = os.open(node, os.O_WRONLY | os.O_NONBLOCK)
        print(f"input (one event node, empty): {_time(source.read):.0f} us CPU")
        os.close(writer)
        source.close()

    if shutil.which("Xvfb"):
        read, write = os.pipe()
        xvfb = subprocess.Popen(
            ["Xvfb", "-displayfd", str(write), "-nolisten", "tcp", "-auth", os.devnull],
            pass_fds=[write],
            stderr=subprocess.DEVNULL,
        )
        os.close(write)
        with os.fdopen(read) as numbers:
            display = ":" + numbers.readline().strip()
        x11 = X11Idle(display)
        print(f"x11 (Xvfb): {_time(x11.read):.0f} us CPU")
        x11.close()
        xvfb.terminate()
        xvfb.wait()


if __name__ == "__main__":
    main()
