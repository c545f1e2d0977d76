"""The control API's parts without I/O: line splitting, request parsing, who may connect."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.control.socket_file import (
    PeerCredentials,
    _proc_groups,
    peer_allowed,
    read_peer_credentials,
)
from agent.control.wire import Call, JobsParams, LineSplitter, LogsParams, NoParams, parse_request

DAEMON_UID, SOCKET_GID = 998, 997


def test_lines_split_across_reads_are_joined() -> None:
    splitter = LineSplitter(100)
    assert splitter.feed(b'{"a"') == []
    assert splitter.feed(b': 1}\n{"b": 2}\n{"c"') == [b'{"a": 1}', b'{"b": 2}']
    assert splitter.feed(b": 3}\r\n") == [b'{"c": 3}\r']
    assert splitter.close() == []


def test_an_overlong_line_is_one_none_and_the_next_line_survives() -> None:
    splitter = LineSplitter(8)
    assert splitter.feed(b"12345") == []
    assert splitter.feed(b"67890") == [None]
    assert splitter.feed(b"still the same line") == []
    assert splitter.feed(b"...\nok\n") == [b"ok"]
    assert splitter.feed(b"12345678\n") == [b"12345678"]


def test_a_last_line_without_newline_counts_at_the_end() -> None:
    splitter = LineSplitter(8)
    assert splitter.feed(b"\n \nabc") == []
    assert splitter.close() == [b"abc"]


@given(st.lists(st.binary(max_size=12).filter(lambda b: b"\n" not in b), max_size=8), st.data())
def test_any_chunking_gives_the_same_lines(lines: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    splitter = LineSplitter(10)
    got: list[bytes | None] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += splitter.feed(stream[start:end])
    expected = [None if len(line) > 10 else line for line in lines if line.strip()]
    assert got == expected


def test_requests_are_parsed_into_their_params() -> None:
    assert parse_request(b'{"id": 1, "method": "status"}') == Call(1, "status", NoParams())
    assert parse_request(b'{"id": 2, "method": "jobs", "params": {"limit": 5}}') == Call(
        2, "jobs", JobsParams(limit=5)
    )
    logs = parse_request(b'{"id": "x", "method": "logs", "params": {"job_id": "j"}}')
    assert logs == Call("x", "logs", LogsParams(job_id="j", follow=False))


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        (PeerCredentials(1, 0, 0), True),  # root
        (PeerCredentials(1, DAEMON_UID, DAEMON_UID), True),  # the agent's own user
        (PeerCredentials(1, 1000, SOCKET_GID), True),  # the group as primary group
        (PeerCredentials(1, 1000, 1000, (27, SOCKET_GID)), True),  # as supplementary
        (PeerCredentials(1, 1000, 1000, (27, 100)), False),
        (PeerCredentials(1, 1000, 1000), False),
        (PeerCredentials(1, 65534, 65534, (DAEMON_UID,)), False),  # the agent's uid as gid
    ],
)
def test_who_may_use_the_socket(peer: PeerCredentials, allowed: bool) -> None:
    assert peer_allowed(peer, daemon_uid=DAEMON_UID, socket_gid=SOCKET_GID) is allowed


def test_peer_credentials_are_the_connecting_process() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        peer = read_peer_credentials(ours)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert set(peer.groups) == set(os.getgroups())


def test_supplementary_groups_from_proc_status(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 27 997 \nNgid:\t0\n")
    assert _proc_groups(status) == (4, 27, 997)
    status.write_text("Name:\tpython\nGroups:\t\n")
    assert _proc_groups(status) == ()
    assert set(_proc_groups(Path("/proc/self/status"))) == set(os.getgroups())
