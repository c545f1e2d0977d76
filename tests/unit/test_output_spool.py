"""Outputs kept for upload: copied from the same reads that hash them, no trap followed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sandbox.outputs import collect_outputs


def test_outputs_kept_for_upload_are_the_bytes_hashed_and_no_trap_is_followed(
    tmp_path: Path,
) -> None:
    out, keep = tmp_path / "out", tmp_path / "keep"
    out.mkdir()
    keep.mkdir()
    (out / "a").write_bytes(b"alpha" * 1000)
    (out / "link").symlink_to("/etc/passwd")
    collected = collect_outputs(out, ["a", "link", "gone"], 1 << 20, keep=keep)
    assert [c.status for c in collected] == ["ok", "not_a_file", "missing"]
    assert (keep / "0").read_bytes() == b"alpha" * 1000
    assert collected[0].sha256 == hashlib.sha256((keep / "0").read_bytes()).hexdigest()
    assert sorted(p.name for p in keep.iterdir()) == ["0"]
    assert (keep / "0").stat().st_mode & 0o777 == 0o600


def test_without_keep_nothing_is_copied(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    [item] = collect_outputs(tmp_path, ["a"], 10)
    assert item.status == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
