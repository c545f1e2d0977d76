"""The tests' own layout holds: markers follow what a test uses, and tests/unit stays pure.

Each case runs pytest in a child process on a copy of tests/'s conftests and support, with
one test file written for the case, and reads what pytest made of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.paths import ROOT, TESTS

DOCKER_TEST = """
def test_uses_the_engine(docker_engine: str) -> None:
    assert docker_engine
"""

GCC_TEST = """
from support.paths import XML


def test_builds_the_fake(library_for) -> None:
    assert library_for(XML / "dual_a5000-v13.xml").exists()
"""

WEBSOCKET_TEST = """
from support.processes import Coordinator


def test_starts_a_coordinator(tmp_path) -> None:
    Coordinator(tmp_path)
"""

PURE_TEST = """
def test_adds() -> None:
    assert 1 + 1 == 2
"""

RUNS_GCC_TEST = """
import subprocess


def test_runs_gcc() -> None:
    subprocess.run(["gcc", "--version"], capture_output=True, check=False)
"""


def _pytest(
    tmp_path: Path, where: str, source: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """pytest on a copy of the layout with ``source`` as tests/<where>/test_case.py."""
    tree = tmp_path / "tree"
    tests = tree / "tests"
    (tests / "unit").mkdir(parents=True, exist_ok=True)
    (tests / "integration").mkdir(exist_ok=True)
    shutil.copy(ROOT / "pyproject.toml", tree)
    shutil.copy(TESTS / "conftest.py", tests)
    shutil.copy(TESTS / "unit" / "conftest.py", tests / "unit")
    for package in ("unit", "integration"):
        (tests / package / "__init__.py").touch()
    if not (tests / "support").exists():
        (tests / "support").symlink_to(TESTS / "support")
        (tests / "fixtures").symlink_to(TESTS / "fixtures")
    (tests / where / "test_case.py").write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", f"tests/{where}", *args],
        cwd=tree,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("source", "marker"),
    [(DOCKER_TEST, "docker"), (GCC_TEST, "gcc"), (WEBSOCKET_TEST, "websocket")],
)
def test_a_test_gets_the_marker_of_what_it_uses(tmp_path: Path, source: str, marker: str) -> None:
    chosen = _pytest(tmp_path, "integration", source, "--collect-only", "-m", marker)
    assert "1 test collected" in chosen.stdout, chosen.stdout + chosen.stderr


def test_a_pure_test_gets_no_marker(tmp_path: Path) -> None:
    left = _pytest(
        tmp_path,
        "unit",
        PURE_TEST,
        "--collect-only",
        "-m",
        "not docker and not gcc and not websocket",
    )
    assert "1 test collected" in left.stdout, left.stdout + left.stderr


@pytest.mark.parametrize(
    ("source", "marker"),
    [(DOCKER_TEST, "docker"), (GCC_TEST, "gcc"), (WEBSOCKET_TEST, "websocket")],
)
def test_a_unit_test_that_needs_a_marker_fails_the_run(
    tmp_path: Path, source: str, marker: str
) -> None:
    run = _pytest(tmp_path, "unit", source)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR
    assert "tests/unit/test_case.py::" in run.stderr
    assert f"({marker})" in run.stderr


def test_a_unit_test_that_runs_gcc_anyway_fails(tmp_path: Path) -> None:
    run = _pytest(tmp_path, "unit", RUNS_GCC_TEST)
    assert run.returncode == pytest.ExitCode.TESTS_FAILED
    assert "runs gcc: it belongs in tests/integration" in run.stdout
