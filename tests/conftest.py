"""What many tests share: the fake NVML built from the recorded captures, /dev and sysfs
roots, the Docker engine and its test image; and the markers.

Each test gets the markers of what it uses (``docker``, ``websocket``, ``gcc``), from the
fixtures it asks for and the names its code (and the fixtures', and the module's helpers')
reaches: ``pytest -m "not docker"`` leaves the engine alone. A test under tests/unit that
gets one fails the run: tests/unit is what runs in seconds, on any machine. ``postgres``
marks a test on a PostgreSQL server.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import types
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from support.engine import TEST_IMAGE
from support.fakenvml import build
from support.images import build_busybox_image
from support.nvml import nvml_config

from hal.backends.nvidia import NvidiaBackend
from hal.types import GpuProfile

UNIT = Path(__file__).resolve().parent / "unit"

#: What each marker means; pyproject.toml registers them (strict markers).
MARKERS = {
    "docker": "needs the Docker engine",
    "websocket": "runs a websocket server or an agent/coordinator process",
    "gcc": "builds the fake libnvidia-ml with gcc",
    "postgres": "runs a PostgreSQL server (tests/support/postgres.py)",
}

#: Fixtures whose use the code cannot show (the engine is reached through a socket path).
MARK_BY_FIXTURE = {
    "docker_engine": "docker",
    "test_image": "docker",
    "postgres_cluster": "postgres",
    "postgres_url": "postgres",
}

#: What a test's code reaches, by qualified name (a module, or a name in one), and its marker.
MARK_BY_NAME = {
    "websockets": "websocket",
    "coordinator.server.Coordinator": "websocket",
    "support.processes": "websocket",
    "support.coordinator_peer.connected": "websocket",
    "support.admission": "websocket",
    "support.tray_daemon.CoordinatorThread": "websocket",
    "support.fakenvml.build.build_library": "gcc",
    "support.fakenvml.build.main": "gcc",
}


def _reached(code: types.CodeType, names: dict[str, object], seen: set[object]) -> Iterator[object]:
    """Every object ``code`` names, following the functions and classes of its own module."""
    if code in seen:
        return
    seen.add(code)
    for name in code.co_names:
        found = names.get(name)
        if found is None:
            continue
        yield found
        if isinstance(found, types.ModuleType):
            # ``build.build_library``: the attribute's name is among the code's names too.
            yield from (getattr(found, attr) for attr in code.co_names if hasattr(found, attr))
        elif inspect.isfunction(found) and found.__globals__ is names:
            yield from _reached(found.__code__, names, seen)
        elif inspect.isclass(found) and found.__module__ == names.get("__name__"):
            for member in vars(found).values():
                function = getattr(member, "__func__", getattr(member, "fget", member))
                if inspect.isfunction(function):
                    yield from _reached(function.__code__, names, seen)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _reached(const, names, seen)


def _qualified(thing: object) -> str:
    if isinstance(thing, types.ModuleType):
        return thing.__name__
    return f"{getattr(thing, '__module__', '')}.{getattr(thing, '__qualname__', '')}"


def _marks_by_name(things: Iterable[object]) -> set[str]:
    marks = set()
    for thing in things:
        name = _qualified(thing)
        for prefix, mark in MARK_BY_NAME.items():
            if name == prefix or name.startswith(prefix + "."):
                marks.add(mark)
    return marks


def _functions(item: pytest.Item) -> Iterator[Callable[..., object]]:
    """The test's function and every fixture function it uses."""
    if isinstance(item, pytest.Function):
        yield item.function
        for name in item.fixturenames:
            for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ()):
                yield fixturedef.func


def _marks_of(item: pytest.Item) -> set[str]:
    marks = {
        MARK_BY_FIXTURE[name]
        for name in getattr(item, "fixturenames", ())
        if name in MARK_BY_FIXTURE
    }
    seen: set[object] = set()
    for wrapped in _functions(item):
        function = inspect.unwrap(wrapped)
        if inspect.isfunction(function):
            marks |= _marks_by_name(_reached(function.__code__, function.__globals__, seen))
    return marks


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with what it uses; refuse the run if a unit test uses any of it."""
    misplaced = []
    for item in items:
        for mark in sorted(_marks_of(item)):
            item.add_marker(mark)
        used = sorted(mark for mark in MARKERS if item.get_closest_marker(mark))
        if used and item.path.is_relative_to(UNIT):
            misplaced.append(f"{item.nodeid} ({', '.join(used)})")
    if misplaced:
        raise pytest.UsageError(
            "tests/unit must need no Docker engine, websocket, gcc or PostgreSQL; move these to"
            " tests/integration:\n  " + "\n  ".join(misplaced)
        )


@pytest.fixture(scope="session")
def library_for(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Path]:
    """Builds the fake libnvidia-ml.so.1 for a capture, once per session."""
    built: dict[Path, Path] = {}

    def library(capture: Path) -> Path:
        if capture not in built:
            out = tmp_path_factory.mktemp(capture.stem)
            built[capture] = build.build_library(build.parse_capture(capture), out)
        return built[capture]

    return library


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """Where a test builds its sysfs tree."""
    return tmp_path / "sys"


@pytest.fixture
def dev(tmp_path: Path) -> Path:
    """An empty /dev for a test to stand device nodes in."""
    path = tmp_path / "dev"
    path.mkdir()
    return path


# ------------------------------------------------------------------ the Docker engine


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """The engine's socket; skips, or fails under GPU_AGENT_REQUIRE_DOCKER=1, without one."""
    socket_path = "/var/run/docker.sock"
    probe = (
        subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if shutil.which("docker")
        else None
    )
    if probe is None or probe.returncode != 0:
        reason = "no Docker engine reachable" + (f": {probe.stderr.strip()}" if probe else "")
        if os.environ.get("GPU_AGENT_REQUIRE_DOCKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return socket_path


@pytest.fixture(scope="session")
def test_image(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local image of static busybox (nothing can be pulled here), with a setuid copy."""
    return build_busybox_image(TEST_IMAGE, tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="session")
def test_image_id(test_image: str) -> str:
    """The test image's id, ``sha256:<hex>``: how an offer pins an image built here (an
    offer never names a tag)."""
    return subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", test_image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake NVML's control file, named in ``FAKENVML_CONTROL`` (absent: no faults)."""
    path = tmp_path / "control"
    monkeypatch.setenv("FAKENVML_CONTROL", str(path))
    return path


@pytest.fixture
def nvidia_for(
    library_for: Callable[[Path], Path], tmp_path: Path, control: Path
) -> Iterator[Callable[[Path], tuple[NvidiaBackend, list[GpuProfile]]]]:
    """Opens the NVIDIA backend in this process on a capture's fake library (faults from
    ``control``); the backends and their profiles; closed after the test."""
    opened: list[NvidiaBackend] = []

    def backend(capture: Path) -> tuple[NvidiaBackend, list[GpuProfile]]:
        nvidia = NvidiaBackend(nvml_config(library_for(capture), tmp_path))
        profiles = nvidia.open()
        opened.append(nvidia)
        return nvidia, profiles

    yield backend
    for nvidia in opened:
        nvidia.close()
