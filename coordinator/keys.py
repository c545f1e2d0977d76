"""The coordinator's Ed25519 signing key: created on first start, refused when unsafe.

``state_dir/coordinator.key`` holds the private key as unencrypted PKCS#8 PEM, mode 0600.
Agents pin its public key (``gpu-coordinator key`` prints it, and only reads: a mistyped
state directory must not yield a fresh key that no agent trusts); a key that group or
others may read could be known to someone else, who could then pose as this coordinator,
so it is refused rather than used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from agent.protocol import crypto
from coordinator.errors import KeyFileError

__all__ = ["KEY_FILE", "CoordinatorKey", "load", "load_or_create"]

KEY_FILE = "coordinator.key"
_MAX_KEY_BYTES = 16 * 1024  # a PEM Ed25519 key is 119 bytes


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
    data = _read(path)
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
    data = _read(path)
    if data is None:
        _create(path)
        # Read back what is on disk: if another process won the race, its key is the one.
        data = _read(path)
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


def _read(path: Path) -> bytes | None:
    """The key file's bytes after its checks, or None when there is none."""
    # The checks run on the opened descriptor, so the name cannot be swapped in between.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError("key_permissions", f"{path} is a symbolic link") from None
        raise KeyFileError("key_unreadable", f"{path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError("key_permissions", f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                "key_permissions",
                f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, open to group or others; "
                "chmod 600 it if the key never leaked, else delete it and re-pin agents",
            )
        data = os.read(fd, _MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise KeyFileError("key_unreadable", f"{path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_BYTES:
        raise KeyFileError("key_corrupt", f"{path} is over {_MAX_KEY_BYTES} bytes")
    return data


def _create(path: Path) -> None:
    """Write a fresh key to ``path`` atomically, unless a key appeared there meanwhile."""
    pem = crypto.private_key_pem(crypto.generate_private_key())
    # Born 0600 under O_EXCL in a temporary name, linked into place when complete: a crash
    # never leaves a half-written key, and no file someone else prepared is reused.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        # FileExistsError: another process created the key first; its key is the one.
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    except OSError as exc:
        raise KeyFileError("key_unwritable", f"cannot create {path}: {exc}") from None
    finally:
        temporary.unlink(missing_ok=True)
