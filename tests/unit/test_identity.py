"""The node key on disk: created once and safely, loaded the same, refused when unsafe."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import AgentError, IdentityError
from agent.link.identity import Identity, load_or_create, show
from agent.protocol import crypto


@pytest.fixture
def identity_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "identity"


@pytest.fixture
def no_umask() -> Iterator[None]:
    # With umask 0, a mode given at creation is the mode on disk: nothing hides a wide one.
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _code(identity_dir: Path) -> str:
    with pytest.raises(IdentityError) as raised:
        load_or_create(identity_dir)
    assert isinstance(raised.value, AgentError)
    return raised.value.code


def _write_key(path: Path, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, mode)


def test_first_start_creates_a_private_key_readable_by_the_owner_only(
    identity_dir: Path, no_umask: None
) -> None:
    identity = load_or_create(identity_dir)
    key_file = identity_dir / "node.key"
    assert _mode(identity_dir) == 0o700
    assert _mode(key_file) == 0o600
    assert key_file.stat().st_uid == os.geteuid()
    pem = key_file.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert crypto.public_key_bytes(crypto.load_private_key_pem(pem)) == identity.public_key
    assert sorted(p.name for p in identity_dir.iterdir()) == ["node.key", "node.pub", "node_id"]


def test_first_start_writes_the_public_key_and_node_id(identity_dir: Path) -> None:
    identity = load_or_create(identity_dir)
    public = (identity_dir / "node.pub").read_text(encoding="ascii")
    assert crypto.b64decode(public.strip()) == identity.public_key
    assert (identity_dir / "node_id").read_text(encoding="ascii") == identity.node_id + "\n"
    assert identity.node_id == crypto.node_id(identity.public_key)
    assert identity.key_id == crypto.key_id(identity.public_key)


def test_a_second_start_loads_the_same_identity(identity_dir: Path) -> None:
    first = load_or_create(identity_dir)
    pem = (identity_dir / "node.key").read_bytes()
    second = load_or_create(identity_dir)
    assert second.node_id == first.node_id
    assert second.public_key == first.public_key
    assert (identity_dir / "node.key").read_bytes() == pem


def test_an_existing_key_is_used_as_it_is(identity_dir: Path) -> None:
    identity_dir.mkdir(parents=True, mode=0o700)
    key = crypto.generate_private_key()
    _write_key(identity_dir / "node.key", crypto.private_key_pem(key))
    identity = load_or_create(identity_dir)
    assert identity.public_key == crypto.public_key_bytes(key)


def test_tampered_derived_files_are_rewritten_from_the_key(identity_dir: Path) -> None:
    identity = load_or_create(identity_dir)
    (identity_dir / "node_id").write_text("node-someone-else\n", encoding="ascii")
    (identity_dir / "node.pub").unlink()
    load_or_create(identity_dir)
    assert (identity_dir / "node_id").read_text(encoding="ascii") == identity.node_id + "\n"
    assert (identity_dir / "node.pub").read_text(encoding="ascii").strip() == (
        identity.public_key_b64
    )


def test_the_private_key_is_not_in_the_repr(identity_dir: Path) -> None:
    identity = load_or_create(identity_dir)
    assert "private_key" not in repr(identity)


@pytest.mark.parametrize(
    "mode",
    [0o644, 0o640, 0o620, 0o604, 0o602, 0o660, 0o666, 0o601, 0o610],
    ids=oct,
)
def test_a_key_file_open_to_group_or_others_is_refused(identity_dir: Path, mode: int) -> None:
    load_or_create(identity_dir)
    os.chmod(identity_dir / "node.key", mode)
    assert _code(identity_dir) == "key_permissions"


def test_a_symlinked_key_file_is_refused(identity_dir: Path, tmp_path: Path) -> None:
    identity_dir.mkdir(parents=True, mode=0o700)
    elsewhere = tmp_path / "elsewhere.key"
    _write_key(elsewhere, crypto.private_key_pem(crypto.generate_private_key()))
    (identity_dir / "node.key").symlink_to(elsewhere)
    assert _code(identity_dir) == "key_permissions"


def test_a_dangling_symlink_is_refused_not_replaced(identity_dir: Path, tmp_path: Path) -> None:
    identity_dir.mkdir(parents=True, mode=0o700)
    target = tmp_path / "planted.key"
    (identity_dir / "node.key").symlink_to(target)
    assert _code(identity_dir) == "key_permissions"
    assert not target.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_key_file_owned_by_another_user_is_refused(identity_dir: Path) -> None:
    load_or_create(identity_dir)
    os.chown(identity_dir / "node.key", 65534, -1)
    assert _code(identity_dir) == "key_permissions"


def test_an_identity_directory_owned_by_another_user_is_refused(
    identity_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_or_create(identity_dir)
    uid = identity_dir.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    assert _code(identity_dir) == "key_permissions"


def test_an_identity_directory_writable_by_others_is_refused(identity_dir: Path) -> None:
    load_or_create(identity_dir)
    os.chmod(identity_dir, 0o777)
    assert _code(identity_dir) == "key_permissions"


def test_a_key_path_that_is_not_a_regular_file_is_refused(identity_dir: Path) -> None:
    (identity_dir / "node.key").mkdir(parents=True, mode=0o700)
    os.chmod(identity_dir, 0o700)
    assert _code(identity_dir) == "key_permissions"


def test_a_fifo_at_the_key_path_is_refused_without_blocking(identity_dir: Path) -> None:
    identity_dir.mkdir(parents=True, mode=0o700)
    os.mkfifo(identity_dir / "node.key", 0o600)
    assert _code(identity_dir) == "key_permissions"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        b"x" * (64 * 1024),
    ],
    ids=["empty", "garbage", "bad-pem", "p256-key", "huge"],
)
def test_a_corrupt_key_file_is_refused(identity_dir: Path, data: bytes) -> None:
    identity_dir.mkdir(parents=True, mode=0o700)
    _write_key(identity_dir / "node.key", data)
    assert _code(identity_dir) == "key_corrupt"
    assert (identity_dir / "node.key").read_bytes() == data


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_key_file_is_refused(identity_dir: Path) -> None:
    load_or_create(identity_dir)
    os.chmod(identity_dir / "node.key", 0o000)
    assert _code(identity_dir) == "key_unreadable"


def test_an_identity_directory_that_is_a_file_cannot_be_created(identity_dir: Path) -> None:
    identity_dir.parent.mkdir(parents=True)
    identity_dir.write_bytes(b"")
    assert _code(identity_dir) == "key_unwritable"


def test_show_prints_the_node_id_key_id_and_public_key(identity_dir: Path) -> None:
    identity = load_or_create(identity_dir)
    text = show(identity)
    assert text.splitlines() == [
        f"node id:     {identity.node_id}",
        f"key id:      {identity.key_id}",
        f"public key:  {identity.public_key_b64}",
    ]


def test_identity_from_a_fixed_key_has_a_fixed_node_id() -> None:
    # RFC 8032 section 7.1, TEST 1.
    secret = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    identity = Identity.from_private_key(Ed25519PrivateKey.from_private_bytes(secret))
    assert identity.node_id == "node-eh7ddx5bksrgcytl7bkai36se4"
    assert identity.key_id == "ed25519:21fe31dfa154a261626bf854046fd227"
