"""Key files, read and made alike for the node and the coordinator (keyfile.private)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keyfile.errors import KeyFileError
from keyfile.private import MAX_KEY_BYTES, check_private_dir, create_private, read_private

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="gives a file to another uid")


def _refusal(path: Path) -> KeyFileError:
    with pytest.raises(KeyFileError) as caught:
        read_private(path)
    return caught.value


def test_a_private_file_of_ours_is_read_and_a_missing_one_is_none(tmp_path: Path) -> None:
    create_private(tmp_path / "k", b"secret")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert read_private(tmp_path / "k") == b"secret"
    assert read_private(tmp_path / "none") is None


def test_a_file_open_to_others_is_refused_with_the_fix(tmp_path: Path) -> None:
    create_private(tmp_path / "k", b"secret")
    (tmp_path / "k").chmod(0o640)
    error = _refusal(tmp_path / "k")
    assert error.code == "key_permissions"
    assert "0640" in error.detail


def test_read_private_passes_the_fix_on(tmp_path: Path) -> None:
    create_private(tmp_path / "k", b"secret")
    (tmp_path / "k").chmod(0o604)
    with pytest.raises(KeyFileError, match="delete it"):
        read_private(tmp_path / "k", fix="delete it")


def test_a_symlink_a_fifo_and_a_directory_are_refused(tmp_path: Path) -> None:
    create_private(tmp_path / "real", b"secret")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    os.mkfifo(tmp_path / "fifo", 0o600)  # would block a plain open for ever
    (tmp_path / "dir").mkdir(mode=0o700)
    for name in ("link", "fifo", "dir"):
        assert _refusal(tmp_path / name).code == "key_permissions", name


def test_an_endless_or_huge_file_is_not_read_whole(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MAX_KEY_BYTES + 1))
    big.chmod(0o600)
    assert _refusal(big).code == "key_corrupt"


@needs_root
def test_another_users_file_is_refused_unless_allowed(tmp_path: Path) -> None:
    create_private(tmp_path / "k", b"secret")
    os.chown(tmp_path / "k", 4242, 4242)
    assert _refusal(tmp_path / "k").code == "key_permissions"
    assert read_private(tmp_path / "k", any_owner=True) == b"secret"


def test_a_key_already_there_stands_and_no_temporary_is_left(tmp_path: Path) -> None:
    create_private(tmp_path / "k", b"first")
    create_private(tmp_path / "k", b"second")  # lost the race: the first key is the one
    assert read_private(tmp_path / "k") == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_a_key_cannot_be_made_where_nothing_can_be_written(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as caught:
        create_private(tmp_path / "missing-dir" / "k", b"secret")
    assert caught.value.code == "key_unwritable"


def test_a_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    check_private_dir(keys)
    keys.chmod(0o770)
    with pytest.raises(KeyFileError, match="chmod 700"):
        check_private_dir(keys)
