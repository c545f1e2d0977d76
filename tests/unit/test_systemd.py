"""sd_notify over a real unix datagram socket, as systemd listens for it."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon.systemd import Notifier, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound where $NOTIFY_SOCKET would point."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


def _received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_ready_status_watchdog_and_stopping_reach_the_socket(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    with Notifier({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.enabled
        assert notifier.ready("2 GPUs, connected")
        assert _received(sock) == "READY=1\nSTATUS=2 GPUs, connected"
        assert notifier.status("reconnecting\nin 2 s")
        assert _received(sock) == "STATUS=reconnecting in 2 s"
        assert notifier.watchdog()
        assert _received(sock) == "WATCHDOG=1"
        assert notifier.extend_timeout(1.5)
        assert _received(sock) == "EXTEND_TIMEOUT_USEC=1500000"
        assert notifier.stopping()
        assert _received(sock) == "STOPPING=1"


def test_an_abstract_socket_name_is_reached() -> None:
    name = f"gpu-agent-test-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        with Notifier({"NOTIFY_SOCKET": "@" + name}) as notifier:
            assert notifier.ready()
        assert _received(sock) == "READY=1"


def test_without_systemd_every_call_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_a_value_of_more_than_one_line_is_refused(listener: tuple[socket.socket, str]) -> None:
    with (
        Notifier({"NOTIFY_SOCKET": listener[1]}) as notifier,
        pytest.raises(ValueError, match="one line"),
    ):
        notifier.notify(status="one\ntwo")


def test_a_socket_that_is_gone_is_reported_once_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}) as notifier,
        caplog.at_level(logging.WARNING, logger="agent.daemon.systemd"),
    ):
        assert not notifier.ready()
        assert not notifier.watchdog()
    assert len(caplog.records) == 1
    assert "cannot notify systemd" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_the_watchdog_interval_is_half_of_systemds_for_this_process_only(
    env: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(env, pid=4242) == expected
