"""What the configuration reads from, and checks on, the filesystem.

Every file named by a user (``--config``, ``coordinator.ca_file``,
``coordinator.enrolment_token_file``) is read only if it is a regular file, and at most
:data:`MAX_FILE_BYTES` of it: ``--config /dev/zero`` is refused at once instead of filling
memory. Each fault is a ``ConfigError`` (``bad_config``) that names the file; the caller
says which setting named it. A fault never quotes a secret file's content.
"""

from __future__ import annotations

import errno
import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Final

import msgspec

from agent.errors import ConfigError
from agent.protocol.bodies import EnrolmentToken
from oci import Credentials, OciError, read_logins
from sandbox.files import read_regular

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_TOKEN_FILE_BYTES",
    "ca_file_fault",
    "directory_fault",
    "enrolment_token_fault",
    "read_capped",
    "read_enrolment_token",
    "read_registry_logins",
    "read_toml",
    "registry_logins_fault",
]

MAX_FILE_BYTES: Final = 1 << 20
"""The largest configuration or CA file read (a CA bundle of a few hundred certificates
is about 200 KiB)."""
MAX_TOKEN_FILE_BYTES: Final = 4096
"""The largest enrolment token file read: a token is at most 256 characters."""


def read_capped(path: Path, *, limit: int = MAX_FILE_BYTES, private: bool = False) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them; with ``private``,
    only if neither group nor others may access it (as the node key, agent/link/identity.py).

    Raises:
        FileNotFoundError: there is no such file (the caller decides if that is a fault).
        ConfigError: ``bad_config``: not a regular file, larger than ``limit``, unreadable,
            open to group or others when ``private``.
    """
    try:
        return read_regular(path, limit, private=private)
    except FileNotFoundError:
        raise
    except OSError as exc:
        hint = " (and get a new token if someone else may have read it)" if private else ""
        raise ConfigError("bad_config", f"{path}: {exc.strerror}{hint}") from None


def read_toml(path: Path, *, must_exist: bool) -> dict[str, Any]:
    """The TOML file at ``path`` as tables; ``{}`` if it is missing and need not exist."""
    try:
        data = read_capped(path)
    except FileNotFoundError:
        if must_exist:
            raise ConfigError("bad_config", f"{path}: no such file") from None
        return {}
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("bad_config", f"{path}: cannot read: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("bad_config", f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        # tomllib recurses once per level of [[[...]]] or {a={...}}: 1 MiB holds plenty.
        raise ConfigError("bad_config", f"{path}: not valid TOML: nested too deeply") from None


def ca_file_fault(path: Path) -> str:
    """Why ``path`` cannot serve as a CA bundle ("" if it can): it must hold at least one
    PEM certificate that OpenSSL loads."""
    import ssl  # only a configuration with a CA file pays for it

    try:
        data = read_capped(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    except ConfigError as exc:
        return exc.detail
    try:
        text = data.decode("ascii")
        if "-----BEGIN CERTIFICATE-----" not in text:
            return f"{path} holds no PEM certificate"
        ssl.create_default_context().load_verify_locations(cadata=text)
    except (UnicodeDecodeError, ssl.SSLError, ValueError) as exc:
        return f"{path} is not a PEM CA bundle ({exc})"
    return ""


def read_enrolment_token(path: Path) -> str:
    """The enrolment token in ``path``: one line of printable text (surrounding whitespace
    dropped), of the length the protocol's ``auth`` takes (agent/protocol/bodies.py).

    Raises:
        ConfigError: ``bad_config``: no such file, :func:`read_capped`'s faults (the file
            must be private), or not one token. The detail never quotes the content.
    """
    try:
        data = read_capped(path, limit=MAX_TOKEN_FILE_BYTES, private=True)
    except FileNotFoundError:
        raise ConfigError("bad_config", f"{path}: no such file") from None
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError("bad_config", f"{path}: not UTF-8 text") from None
    if not token.isprintable():
        # Several lines are several tokens (a coordinator's whole list?): which one is
        # meant is not this agent's guess.
        raise ConfigError("bad_config", f"{path}: not one token on one line of printable text")
    try:
        return msgspec.convert(token, EnrolmentToken)
    except msgspec.ValidationError:
        raise ConfigError(
            "bad_config", f"{path}: a token is 1 to 256 characters, not {len(token)}"
        ) from None


def read_registry_logins(path: Path) -> dict[str, Credentials]:
    """The registry logins in ``path`` (:func:`oci.read_logins`'s file), by registry host.

    Raises:
        ConfigError: ``bad_config``: missing, unsafe, malformed; never quoting a secret.
    """
    try:
        return read_logins(path)
    except OciError as exc:
        raise ConfigError("bad_config", exc.detail) from None


def registry_logins_fault(path: Path) -> str:
    """Why ``path`` holds no usable registry credentials ("" if it does)."""
    try:
        read_registry_logins(path)
    except ConfigError as exc:
        return exc.detail
    return ""


def enrolment_token_fault(path: Path) -> str:
    """Why ``path`` holds no usable enrolment token ("" if it holds one)."""
    try:
        read_enrolment_token(path)
    except ConfigError as exc:
        return exc.detail
    return ""


def directory_fault(path: Path) -> str:
    """Why ``path`` can never be a directory ("" if it is one or can be made): it, or the
    nearest of its parents that exists, is something else."""
    for candidate in (path, *path.parents):
        try:
            info = os.stat(candidate)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                continue  # a parent is a file: found when the loop reaches it
            return ""  # e.g. not searchable by this user: the daemon will say at start
        if stat.S_ISDIR(info.st_mode):
            return ""
        if candidate == path:
            return f"{path} exists and is not a directory"
        return f"{candidate} is not a directory, so {path} cannot be made"
    return ""
