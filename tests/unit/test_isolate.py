"""Isolated discovery: a hanging or crashing function costs a coded result, not the caller."""

from __future__ import annotations

import os
import signal
import time

import psutil

from hal.errors import DiscoveryFailed
from hal.isolate import Isolated


def _hang() -> bytes:
    while True:
        time.sleep(60)


def _segfault() -> bytes:
    os.kill(os.getpid(), signal.SIGSEGV)
    return b"unreachable"


def _raise() -> bytes:
    raise RuntimeError("bug in a backend")


def test_results_come_back_in_order() -> None:
    assert Isolated([lambda: b"first", lambda: b"second"], 10).results() == [b"first", b"second"]


def test_result_larger_than_a_pipe_buffer_arrives_whole() -> None:
    big = os.urandom(3 << 20)
    assert Isolated([lambda: big], 10).results() == [big]


def test_hanging_function_times_out_without_holding_back_the_others() -> None:
    hung, fine = Isolated([_hang, lambda: b"ok"], 0.5).results()
    assert isinstance(hung, DiscoveryFailed)
    assert hung.code == "timeout"
    assert fine == b"ok"


def test_crash_is_reported_with_the_signal() -> None:
    (result,) = Isolated([_segfault], 10).results()
    assert isinstance(result, DiscoveryFailed)
    assert result.code == "crashed"
    assert "SIGSEGV" in result.detail


def test_exception_in_the_child_is_a_crash_not_an_exception_in_the_caller() -> None:
    (result,) = Isolated([_raise], 10).results()
    assert isinstance(result, DiscoveryFailed)
    assert result.code == "crashed"


def test_timed_out_child_is_killed_and_reaped() -> None:
    Isolated([_hang], 0.2).results()
    Isolated([lambda: b""], 10).results()  # a later run reaps what was still dying
    # No child is left behind for this process to wait on.
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        pid = 0
    assert pid == 0


def test_closing_kills_and_reaps_children_whose_results_were_not_taken() -> None:
    before = _children()
    isolated = Isolated([_hang, _hang], 600)
    started = _children() - before
    isolated.close()
    assert len(started) == 2
    assert not started & _children()


def _children() -> set[int]:
    """This process's children, zombies (killed but not reaped) included."""
    return {child.pid for child in psutil.Process().children()}
