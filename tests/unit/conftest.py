"""What holds tests/unit to needing nothing outside the process, at run time too.

tests/conftest.py refuses a unit test marked docker, websocket or gcc; this catches what no
marker shows: while a unit test runs, starting gcc or docker, or connecting to the Docker
engine's socket, raises instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

FORBIDDEN_PROGRAMS = frozenset({"gcc", "cc", "docker", "dockerd"})
ENGINE_SOCKETS = frozenset({"/var/run/docker.sock", "/run/docker.sock"})
_WATCHED = frozenset({"subprocess.Popen", "socket.connect"})
_running: list[str] = []


def _refuse(event: str, args: tuple[object, ...]) -> None:
    # Called for every audited event in the process: the cheapest test first.
    if event not in _WATCHED or not _running:
        return
    what = None
    if event == "subprocess.Popen":
        argv = args[1]
        first = argv[0] if isinstance(argv, list | tuple) and argv else args[0]
        if Path(str(first)).name in FORBIDDEN_PROGRAMS:
            what = f"runs {first}"
    elif event == "socket.connect":
        address = args[1]
        if isinstance(address, bytes):
            address = address.decode(errors="replace")
        if address in ENGINE_SOCKETS:
            what = f"connects to {address}"
    if what is not None:
        raise RuntimeError(f"{_running[-1]} {what}: it belongs in tests/integration")


sys.addaudithook(_refuse)


@pytest.fixture(autouse=True)
def _nothing_outside(request: pytest.FixtureRequest) -> Iterator[None]:
    """Turns the refusal on while the test and its function-scoped fixtures run."""
    _running.append(request.node.nodeid)
    yield
    _running.pop()
