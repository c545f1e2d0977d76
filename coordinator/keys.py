"""The coordinator's Ed25519 signing key: created on first start, refused when unsafe.

``state_dir/coordinator.key`` holds the private key as unencrypted PKCS#8 PEM, mode 0600.
Agents pin its public key (``gpu-coordinator key`` prints it, and only reads: a mistyped
state directory must not yield a fresh key that no agent trusts); a key that group or
others may read could be known to someone else, who could then pose as this coordinator,
so it is refused rather than used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import keyfile.errors
from agent.protocol import crypto
from coordinator.errors import KeyFileError
from keyfile.private import create_private, read_private

__all__ = ["KEY_FILE", "CoordinatorKey", "load", "load_or_create"]

KEY_FILE = "coordinator.key"
_LEAKED = "chmod 600 it if the key never leaked, else delete it and re-pin agents"


@dataclass(frozen=True, slots=True)
class CoordinatorKey:
    """The coordinator's key pair and its key id."""

    private_key: crypto.PrivateKey = field(repr=False)
    public_key: bytes
    key_id: str

    @property
    def public_key_b64(self) -> str:
        """The raw public key in standard base64, as agents pin it."""
        return crypto.b64encode(self.public_key)

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature of ``data``."""
        return crypto.sign(self.private_key, data)


def load(state_dir: Path) -> CoordinatorKey:
    """The key kept in ``state_dir``; nothing is created.

    Raises:
        KeyFileError: ``key_missing`` when there is none, else as :func:`load_or_create`.
    """
    path = state_dir / KEY_FILE
    with _as_coordinator_error():
        # Root may read the key of a coordinator that runs as its own user.
        data = read_private(path, any_owner=os.geteuid() == 0, fix=_LEAKED)
    if data is None:
        raise KeyFileError(
            "key_missing",
            f"no key in {state_dir}: `gpu-coordinator serve --state-dir {state_dir}` creates "
            f"it at its first start, or `gpu-coordinator key --create --state-dir {state_dir}`",
        )
    return _parse(path, data)


def load_or_create(state_dir: Path) -> CoordinatorKey:
    """The key kept in ``state_dir``, created there on first start.

    Raises:
        KeyFileError: ``key_permissions`` when the file is open to group or others, is not
            a regular file or is a symlink; ``key_unreadable`` / ``key_unwritable`` on I/O
            errors; ``key_corrupt`` when it is not an Ed25519 private key.
    """
    try:
        # mkdir's mode only loses bits to the umask, so the directory is never wider.
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError("key_unwritable", f"cannot create {state_dir}: {exc}") from None
    path = state_dir / KEY_FILE
    with _as_coordinator_error():
        data = read_private(path, fix=_LEAKED)
        if data is None:
            create_private(path, crypto.private_key_pem(crypto.generate_private_key()))
            # Read back what is on disk: if another process won the race, its key is the one.
            data = read_private(path, fix=_LEAKED)
    if data is None:
        raise KeyFileError("key_unreadable", f"{path} vanished after its creation")
    return _parse(path, data)


def _parse(path: Path, data: bytes) -> CoordinatorKey:
    try:
        key = crypto.load_private_key_pem(data)
    except ValueError as exc:
        raise KeyFileError("key_corrupt", f"{path}: {exc}") from None
    public = crypto.public_key_bytes(key)
    return CoordinatorKey(private_key=key, public_key=public, key_id=crypto.key_id(public))


@contextlib.contextmanager
def _as_coordinator_error() -> Iterator[None]:
    """The key file library's refusals, as the coordinator's."""
    try:
        yield
    except keyfile.errors.KeyFileError as exc:
        raise KeyFileError(exc.code, exc.detail) from None
