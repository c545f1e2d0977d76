"""What the configuration reads from, and checks on, the filesystem.

Every file named by a user (``--config``, ``coordinator.ca_file``) is read only if it is a
regular file, and at most :data:`MAX_FILE_BYTES` of it: ``--config /dev/zero`` is refused
at once instead of filling memory. Each fault is a ``ConfigError`` (``bad_config``) that
names the file; the caller says which setting named it.
"""

from __future__ import annotations

import errno
import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Final

from agent.errors import ConfigError
from sandbox.files import read_regular

__all__ = ["MAX_FILE_BYTES", "ca_file_fault", "directory_fault", "read_capped", "read_toml"]

MAX_FILE_BYTES: Final = 1 << 20
"""The largest configuration or CA file read (a CA bundle of a few hundred certificates
is about 200 KiB)."""


def read_capped(path: Path, *, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    Raises:
        FileNotFoundError: there is no such file (the caller decides if that is a fault).
        ConfigError: ``bad_config``: not a regular file, larger than ``limit``, unreadable.
    """
    try:
        return read_regular(path, limit)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError("bad_config", f"{path}: {exc.strerror}") from None


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
