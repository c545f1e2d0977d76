"""Registry logins from a private TOML file, read alike by the agent and the coordinator::

    [registry."registry.example.com:5000"]
    username = "puller"
    password = "..."

The file must be the reader's own, not a symbolic link, and closed to group and others
(:mod:`keyfile.private`'s checks): it holds passwords. No error quotes a value from it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated

import msgspec

from keyfile.errors import KeyFileError
from keyfile.private import read_private
from oci.client import Credentials
from oci.errors import OciError

__all__ = ["read_logins"]

_HOST = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:[0-9]{1,5})?(?!\n)$")


class _Login(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    username: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


def read_logins(path: Path, *, any_owner: bool = False) -> dict[str, Credentials]:
    """The logins in ``path`` by registry host (``host[:port]``).

    Raises:
        OciError: ``bad_logins_file``: missing, unsafe (see the module), larger than a
            key file may be, not TOML of that shape.
    """
    try:
        data = read_private(path, any_owner=any_owner, fix="chmod 600 it")
    except KeyFileError as exc:
        raise OciError("bad_logins_file", exc.detail) from None
    if data is None:
        raise OciError("bad_logins_file", f"{path}: no such file")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        # TOML's messages name a line and column, never the value there.
        raise OciError("bad_logins_file", f"{path}: not TOML: {exc}") from None
    unknown = sorted(set(table) - {"registry"})
    if unknown:
        raise OciError("bad_logins_file", f"{path}: unknown table {unknown[0]!r}")
    registries = table.get("registry", {})
    if not isinstance(registries, dict):
        raise OciError("bad_logins_file", f"{path}: registry is not a table")
    logins: dict[str, Credentials] = {}
    for host, login in registries.items():
        if not _HOST.fullmatch(host):
            raise OciError("bad_logins_file", f"{path}: {host!r} is not a registry host[:port]")
        try:
            checked = msgspec.convert(login, _Login)
        except msgspec.ValidationError as exc:
            where = str(exc).rpartition(" - at ")[2] or "the entry"
            raise OciError(
                "bad_logins_file", f"{path}: registry {host!r}: {where} is not valid"
            ) from None
        logins[host] = Credentials(checked.username, checked.password)
    return logins
