"""The node's identity on disk: an Ed25519 key created on first start, refused when unsafe.

``identity_dir`` (mode 0700) holds::

    node.key    the private key, PKCS#8 PEM, unencrypted, mode 0600
    node.pub    the raw 32-byte public key in base64, one line
    node_id     the node id, one line

``node.key`` is the only source of truth: ``node.pub`` and ``node_id`` are derived from it
for operators and rewritten when they differ. Like OpenSSH with its host keys, the agent
refuses a key file that group or others may access, that another user owns, or that is a
symbolic link: such a key may be known, or swapped, by someone else.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import IdentityError
from agent.protocol import crypto
from keyfile.errors import KeyFileError
from keyfile.private import check_private_dir, create_private, read_private

__all__ = [
    "IDENTITY_DIR",
    "KEY_FILE",
    "NODE_ID_FILE",
    "PUBLIC_KEY_FILE",
    "Identity",
    "load_existing",
    "load_or_create",
    "show",
]

IDENTITY_DIR = "identity"
"""The identity directory's name in the state directory."""
KEY_FILE = "node.key"
PUBLIC_KEY_FILE = "node.pub"
NODE_ID_FILE = "node_id"

_LEAKED = "chmod 600 it if the key never leaked, else delete it to make a new identity"


@dataclass(frozen=True, slots=True)
class Identity:
    """The node's key pair and the names derived from its public key."""

    private_key: crypto.PrivateKey = field(repr=False)
    public_key: bytes
    """The raw 32-byte Ed25519 public key."""
    node_id: str
    key_id: str

    @classmethod
    def from_private_key(cls, key: crypto.PrivateKey) -> Identity:
        """The identity of ``key``."""
        public = crypto.public_key_bytes(key)
        return cls(key, public, crypto.node_id(public), crypto.key_id(public))

    @property
    def public_key_b64(self) -> str:
        """The raw public key in standard base64."""
        return crypto.b64encode(self.public_key)


def load_or_create(identity_dir: Path) -> Identity:
    """The identity kept in ``identity_dir``, created there on first start.

    Raises:
        IdentityError: ``key_permissions`` when the key file or directory is unsafe (see
            the module docstring); ``key_unreadable``, ``key_unwritable`` when it cannot be
            read or created; ``key_corrupt`` when the file is not an Ed25519 private key.
    """
    key_path = identity_dir / KEY_FILE
    with _as_identity_error():
        try:
            identity_dir.parent.mkdir(parents=True, exist_ok=True)
            # mkdir's mode only loses bits to the umask, so the directory is never wider.
            identity_dir.mkdir(mode=0o700, exist_ok=True)
            check_private_dir(identity_dir)
        except OSError as exc:
            raise KeyFileError("key_unwritable", f"cannot create {identity_dir}: {exc}") from None
        data = read_private(key_path, fix=_LEAKED)
        if data is None:
            create_private(key_path, crypto.private_key_pem(crypto.generate_private_key()))
            # Read back what is on disk: if another process won the race, its key is the one.
            data = read_private(key_path, fix=_LEAKED)
            if data is None:
                raise KeyFileError("key_unreadable", f"{key_path} vanished after its creation")
    try:
        key = crypto.load_private_key_pem(data)
    except ValueError as exc:
        raise IdentityError("key_corrupt", f"{key_path}: {exc}") from None
    identity = Identity.from_private_key(key)
    _write_derived(identity_dir / PUBLIC_KEY_FILE, identity.public_key_b64 + "\n")
    _write_derived(identity_dir / NODE_ID_FILE, identity.node_id + "\n")
    return identity


def load_existing(identity_dir: Path) -> Identity:
    """The identity kept in ``identity_dir``, read only: nothing is created or rewritten.

    The checks are :func:`load_or_create`'s, except that root may read a key another
    user owns (``sudo gpu-agent keys show`` on a service that runs as its own user).

    Raises:
        IdentityError: ``key_missing`` when there is no key yet, else as
            :func:`load_or_create`.
    """
    key_path = identity_dir / KEY_FILE
    root = os.geteuid() == 0
    with _as_identity_error():
        try:
            check_private_dir(identity_dir, any_owner=root)
            data = read_private(key_path, any_owner=root, fix=_LEAKED)
        except FileNotFoundError:
            data = None
        except OSError as exc:
            raise KeyFileError("key_unreadable", f"{identity_dir}: {exc.strerror}") from None
    if data is None:
        raise IdentityError(
            "key_missing",
            f"no key in {identity_dir}: the agent creates it at its first start "
            "(gpu-agent run), or create it now with gpu-agent keys create",
        )
    try:
        return Identity.from_private_key(crypto.load_private_key_pem(data))
    except ValueError as exc:
        raise IdentityError("key_corrupt", f"{key_path}: {exc}") from None


def show(identity: Identity) -> str:
    """The text of ``gpu-agent keys show``: node id, key id and public key."""
    return "\n".join(
        [
            f"node id:     {identity.node_id}",
            f"key id:      {identity.key_id}",
            f"public key:  {identity.public_key_b64}",
        ]
    )


@contextlib.contextmanager
def _as_identity_error() -> Iterator[None]:
    """The key file library's refusals, as the agent's (the node's key is its identity)."""
    try:
        yield
    except KeyFileError as exc:
        raise IdentityError(exc.code, exc.detail) from None


def _write_derived(path: Path, text: str) -> None:
    """Make ``path`` hold ``text``, replacing it atomically only when it differs."""
    content = text.encode("ascii")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            current = os.read(fd, len(content) + 1)
        finally:
            os.close(fd)
    except OSError:
        current = None  # missing, a symlink, unreadable: replace it
    if current == content:
        return
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        _write_new(temporary, content, 0o644)
        # os.replace swaps the name itself and never writes through a symlink.
        os.replace(temporary, path)
    except OSError as exc:
        raise IdentityError("key_unwritable", f"cannot write {path}: {exc}") from None
    finally:
        temporary.unlink(missing_ok=True)


def _write_new(path: Path, content: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
