"""The repository stands alone, and what it installs is what the lock pins."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]

# One pinned requirement of a uv/pip-tools hashed lock: "name==version [; marker] \".
_PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def locked(name: str) -> dict[str, tuple[str, list[str]]]:
    """Package -> (version, hashes) of one lock file, for the packages this Python installs."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current: list[str] = []
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        if match := _PIN.match(line):
            package, version, marker = match.groups()
            current = []
            if marker is None or Marker(marker).evaluate():
                pins[canonicalize_name(package)] = (version, current)
        elif line.strip().startswith("--hash=sha256:"):
            current.append(line.strip().removeprefix("--hash=sha256:").rstrip(" \\"))
    return pins


def pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if listed.returncode != 0:  # an exported tree, not a checkout: walk it instead
        return [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts]
    return [ROOT / name for name in listed.stdout.decode().split("\0") if name]


@pytest.mark.parametrize(
    "name",
    [
        "requirements-build.txt",
        "requirements.txt",
        "requirements-test.txt",
        "requirements-tools.txt",
        "requirements-tray.txt",
    ],
)
def test_every_locked_package_is_pinned_with_hashes(name: str) -> None:
    pins = locked(name)
    assert pins
    assert sorted(p for p, (_, hashes) in pins.items() if not hashes) == []


@pytest.mark.parametrize(
    ("lock", "extras"), [("requirements.txt", ()), ("requirements-test.txt", ("test", "tray"))]
)
def test_the_lock_holds_every_dependency_within_its_range(
    lock: str, extras: tuple[str, ...]
) -> None:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    pins = locked(lock)
    missing = [str(r) for r in wanted if canonicalize_name(r.name) not in pins]
    outside = [
        f"{r} (locked {pins[canonicalize_name(r.name)][0]})"
        for r in wanted
        if canonicalize_name(r.name) in pins
        and not r.specifier.contains(pins[canonicalize_name(r.name)][0], prereleases=True)
    ]
    assert (missing, outside) == ([], [])


def test_this_environment_runs_what_the_test_lock_pins() -> None:
    drift = {
        package: (version, installed)
        for package, (version, _) in locked("requirements-test.txt").items()
        if (installed := metadata.version(package)) != version
    }
    assert drift == {}, "install from the lock: make .venv/.test (or make lock, then that)"


def test_nothing_reads_outside_the_repository() -> None:
    # A clone from a forge has nothing beside it: no shared folder, no sibling checkout.
    outside = re.compile(rb'\.\./shared|/ "shared"')
    found = [
        str(path.relative_to(ROOT))
        for path in tracked_files()
        if path.suffix in {".py", ".sh", ".md", ".toml", ".yaml", ".cfg", ""}
        and path.is_file()
        and path != Path(__file__)
        and outside.search(path.read_bytes())
    ]
    assert found == []
