"""Hostile trees and paths: a job's /output, a spec's paths, on the real engine and runtimes.

These tests need nothing outside this process; the others are in
tests/integration/test_hostile_files.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.hostile_files import as_nobody, nest

from sandbox.errors import SpecError
from sandbox.fstree import TreeChanged, walk
from sandbox.jobdir import JobDir
from sandbox.outputs import collect_outputs
from sandbox.spec import load_spec

MiB = 1 << 20


def test_a_tree_moved_under_the_walk_is_noticed_not_climbed_out_of(tmp_path: Path) -> None:
    (tmp_path / "top" / "a" / "b").mkdir(parents=True)
    (tmp_path / "top" / "a" / "b" / "f").write_text("x")

    def visit(fd: int, entry: os.DirEntry[str]) -> bool:
        if entry.name == "f":  # inside b: move b out of a, as a running job may
            os.rename(tmp_path / "top" / "a" / "b", tmp_path / "top" / "b")
        return entry.is_dir(follow_symlinks=False)

    top = os.open(tmp_path / "top", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(TreeChanged):
            walk(top, visit)
    finally:
        os.close(top)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("a/" * 1500 + "x", "path_too_long"),
        ("a/" * 32 + "x", "path_too_deep"),
        ("x" * 256, "path_too_long"),
        ("/".join(["abc"] * 256) + "xx", "path_too_long"),
    ],
)
@pytest.mark.parametrize("where", ["inputs", "outputs"])
def test_a_spec_path_too_deep_or_too_long_is_refused_with_its_code(
    path: str, code: str, where: str
) -> None:
    field: object = [{"path": path, "content": ""}] if where == "inputs" else [path]
    with pytest.raises(SpecError) as refused:
        load_spec(json.dumps({"image": "x", where: field}).encode(), "json")
    assert refused.value.code == code
    assert refused.value.field == (f"{where}[0].path" if where == "inputs" else f"{where}[0]")


def test_paths_at_the_limits_are_accepted() -> None:
    deepest = "/".join(["d"] * 31 + ["x" * 255])
    longest = "/".join(["y" * 255] * 3 + ["y" * 254]) + "/z"
    assert len(longest) == 1024
    raw = {"image": "x", "inputs": [{"path": deepest, "content": ""}], "outputs": [longest]}
    spec = load_spec(json.dumps(raw).encode(), "json")
    assert spec.outputs == [longest]


@pytest.fixture
def deep_output(tmp_path: Path) -> Iterator[tuple[JobDir, int]]:
    """A job directory whose output holds a chain past PATH_MAX; its bottom, open."""
    job = JobDir(tmp_path, "job")
    (job.path / "output").mkdir(parents=True)
    bottom = nest(job.path / "output", 300, "d" * 20)
    yield job, bottom
    os.close(bottom)


def test_the_output_watch_counts_past_path_max(deep_output: tuple[JobDir, int]) -> None:
    job, bottom = deep_output
    with open(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=bottom), "wb") as file:
        file.write(b"x" * 8 * MiB)
    assert job.output_overflow(64 * MiB) is None
    assert job.output_overflow(4 * MiB) == f"/output holds more than {4 * MiB} bytes"


def test_an_unreadable_directory_counts_as_over_not_as_empty(
    tmp_path: Path, deep_output: tuple[JobDir, int]
) -> None:
    _, bottom = deep_output
    # As an agent that is not root sees it: root reads through any mode.
    os.chmod(tmp_path, 0o755)
    relative = JobDir(Path("."), "job")
    assert as_nobody(tmp_path, lambda: relative.output_overflow(64 * MiB) is None)
    os.chmod(".", 0, dir_fd=bottom)
    assert as_nobody(
        tmp_path, lambda: "cannot measure" in (relative.output_overflow(64 * MiB) or "")
    )


def test_collecting_an_output_that_is_a_directory_is_a_coded_status(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_bytes(b"data")
    collected = collect_outputs(tmp_path, ["dir", "fifo", "file"], 1 * MiB)
    assert [o.status for o in collected] == ["not_a_file", "not_a_file", "ok"]
