"""Checks of ``gpu-coordinator``'s arguments, run before anything is written or sent.

``serve`` creates a key, a database and an admin file, and binds two ports: each argument
that could make one of those fail is checked first, read-only, so that a typo is refused
with a code and leaves nothing behind. The admin commands' ids are checked against the
protocol's patterns, so that one that no coordinator could accept never reaches one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import sqlite3
import ssl
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from agent.protocol.limits import MAX_ERROR_DETAIL_CHARS
from coordinator.db import URL_SCHEMES, DbTarget, describe, driver_errors, redact
from coordinator.errors import ConfigError, JobError
from coordinator.images import ImagePinner
from coordinator.offers import MAX_TTL_S
from oci import Credentials, OciError, read_logins

__all__ = [
    "JOB_ID",
    "NODE_ID",
    "artifacts_port",
    "check_addresses",
    "check_db",
    "check_job_id",
    "check_node_id",
    "check_reason",
    "check_state_dir",
    "check_ttl",
    "gateway_port",
    "parse_uploads",
    "public_url",
    "tls_context",
]

#: A job id, as ``agent.protocol.jobs.Offer`` takes it (a test checks that they agree).
#: Used with fullmatch, which also refuses the trailing newline that the protocol's
#: ``^...$`` patterns let through (msgspec searches them with ``re``).
JOB_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: A node id, as ``agent.protocol.jobs.Offer`` takes it.
NODE_ID: Final = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_SQLITE_HEADER = b"SQLite format 3\0"
#: Tables every store has had since its first schema: a database without them is another's.
_STORE_TABLES = frozenset(("nodes", "messages"))
_MAX_PEM_BYTES = 1024 * 1024


def check_job_id(job_id: str) -> None:
    """Refuse a job id the protocol does not allow (JobError ``bad_job_id``)."""
    if not JOB_ID.fullmatch(job_id):
        raise JobError(
            "bad_job_id", f"{job_id!r}: 1-64 of A-Z a-z 0-9 _ . -, a letter or digit first"
        )


def check_node_id(node_id: str) -> None:
    """Refuse a node id the protocol does not allow (JobError ``bad_node_id``)."""
    if not NODE_ID.fullmatch(node_id):
        raise JobError("bad_node_id", f"{node_id!r}: 1-128 of A-Z a-z 0-9 . _ : @ / + = -")


def check_reason(reason: str) -> None:
    """Refuse a cancel reason longer than a node is told (JobError ``bad_reason``)."""
    if len(reason) > MAX_ERROR_DETAIL_CHARS:
        raise JobError("bad_reason", f"a reason is at most {MAX_ERROR_DETAIL_CHARS} characters")


def check_ttl(ttl_s: float) -> None:
    """Refuse an offer lifetime the coordinator refuses (JobError ``bad_ttl``)."""
    if not 0 < ttl_s <= MAX_TTL_S:
        raise JobError("bad_ttl", f"--ttl must be in (0, {MAX_TTL_S:.0f}] seconds")


def artifacts_port(port: int, given: int | None) -> int:
    """The artifact listener's port: ``given``, else the one after the websocket's.

    A fixed port, not any free one: the upload URLs signed into offers name it, and must
    still reach the store after a restart. Derived from ``port`` so that a coordinator
    moved to another port (or a second one on the host) needs no second option; with
    ``port`` 0 (any free) it is any free one too.

    Raises:
        ConfigError: ``bad_address`` (``port`` is 65535: no port after it).
    """
    if given is not None:
        return given
    if port == 0:
        return 0
    if port >= 65535:
        raise ConfigError("bad_address", "--port 65535 leaves no default --artifacts-port")
    return port + 1


def gateway_port(port: int, given: int | None) -> int:
    """The gateway's port: ``given``, else the second after the websocket's (the first is
    the artifact listener's): clients are told a fixed one; any free one with ``port`` 0.

    Raises:
        ConfigError: ``bad_address`` (``port`` is over 65533: no port two after it).
    """
    if given is not None:
        return given
    if port == 0:
        return 0
    if port >= 65534:
        raise ConfigError("bad_address", f"--port {port} leaves no default --gateway-port")
    return port + 2


def public_url(text: str, option: str = "--artifacts-url") -> str:
    """An ``--artifacts-url`` (or ``option``): ``http(s)://host[:port]`` as others reach
    a listener.

    Raises:
        ConfigError: ``bad_address`` (not such a URL: a path, query, fragment or login
            would not survive the ``/artifacts/...`` appended to it).
    """
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError("bad_address", f"{option} {text!r}: {exc}") from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or "@" in parts.netloc
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or not text.isprintable()
    ):
        raise ConfigError("bad_address", f"{option} {text!r} is not http(s)://host[:port]")
    return f"{parts.scheme}://{parts.netloc}"


def check_addresses(addresses: Sequence[tuple[str, int]]) -> None:
    """Bind (then close) what the server will bind, all at once, so that it is known to work.

    Raises:
        ConfigError: ``bad_address`` (no such host, or not an address of this machine),
            ``address_in_use`` (by another program, or twice in ``addresses``).
    """
    with contextlib.ExitStack() as probes:
        for host, port in addresses:
            for family, kind, proto, _, address in _resolve(host, port):
                probe = probes.enter_context(socket.socket(family, kind, proto))
                # As asyncio binds: SO_REUSEADDR, and IPv6 sockets for IPv6 only. Listening
                # makes a second probe of the same port fail, as the second server would.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    probe.bind(address)
                    probe.listen()
                except OSError as exc:
                    code = "address_in_use" if exc.errno == errno.EADDRINUSE else "bad_address"
                    where = f"{host or '*'} port {port}"
                    raise ConfigError(code, f"cannot listen on {where}: {exc.strerror}") from None


def _resolve(host: str, port: int) -> list[tuple[Any, ...]]:
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError) as exc:  # gaierror; an embedded NUL; a label too long
        raise ConfigError("bad_address", f"{host!r} is no address to listen on: {exc}") from None
    return [tuple(item) for item in found]


def check_db(text: str | Path) -> DbTarget:
    """The store ``serve --db`` names: a SQLite file's path, or a ``postgresql://`` URL;
    refused if the store could not be opened there, or would be created amiss.

    Raises:
        ConfigError: ``bad_db``: a file whose folder is missing or not writable, or that is
            a directory, not a regular file, unreadable, not an SQLite database, or the
            database of something else (the store would add its tables to it); a URL that
            is malformed, whose server cannot be reached or refuses the login, whose
            database holds another program's tables, or where no table can be created.
    """
    if isinstance(text, str) and text.partition("://")[0].lower() in URL_SCHEMES:
        return _check_postgres(text)
    path = Path(text)
    _check_sqlite(path)
    return path


def _check_postgres(url: str) -> str:
    shown = describe(url)
    try:
        from coordinator import db_postgres
    except ImportError:
        raise ConfigError(
            "bad_db",
            f"{shown}: PostgreSQL needs psycopg: pip install 'gpu-provider-agent[postgres]'",
        ) from None
    try:
        found = db_postgres.inspect(url)
    except driver_errors() as exc:
        # libpq says what failed (the host, the login), quoting a malformed URL whole.
        raise ConfigError("bad_db", f"{shown}: {redact(str(exc).strip())}") from None
    if found.schema is None:
        raise ConfigError("bad_db", f"{shown}: the search path names no schema for the tables")
    if found.tables and not _STORE_TABLES.issubset(found.tables):
        names = ", ".join(sorted(found.tables)[:5])
        raise ConfigError(
            "bad_db", f"{shown}: schema {found.schema} is another program's (tables {names})"
        )
    if not found.tables and not found.can_create:
        raise ConfigError("bad_db", f"{shown}: no right to create tables in {found.schema}")
    return url


def _check_sqlite(path: Path) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError("bad_db", f"{path}: the folder {folder} does not exist")
    # SQLite writes its -wal and -shm files beside the database.
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError("bad_db", f"{path}: the folder {folder} is not writable")
    try:
        # O_NONBLOCK: a FIFO would block the open for ever; O_RDWR: the store writes.
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # created at the start, with the store's tables
    except OSError as exc:
        raise ConfigError("bad_db", f"{path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError("bad_db", f"{path} is not a regular file")
        header = os.read(fd, len(_SQLITE_HEADER))
    except OSError as exc:
        raise ConfigError("bad_db", f"{path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    # An empty file is a database without tables to SQLite: the store makes them.
    if not header:
        return
    if header != _SQLITE_HEADER:
        raise ConfigError("bad_db", f"{path} is not an SQLite database: it is left as it is")
    tables = _tables(path)
    if tables and not _STORE_TABLES.issubset(tables):
        shown = ", ".join(sorted(tables)[:5])
        raise ConfigError("bad_db", f"{path} is the database of something else (tables {shown})")


def _tables(path: Path) -> set[str]:
    """The names of the tables in the database file, read without writing anything."""
    # Without a -wal beside it the file alone is the database: read immutable (no lock, no
    # -wal or -shm made beside it, which a plain read-only open of a WAL database makes).
    # With one, the database is the file and its WAL together, and the file alone may be
    # torn: a checkpoint copies page 1 first, so a coordinator killed -9 in one leaves a
    # header that counts pages the file does not have yet, which SQLite reads as corrupt
    # (the 10,000-agent restart refused its store so). Read through the WAL then, read-only
    # (SQLite's locks; it recovers the WAL index as the store would at its open).
    wal = path.with_name(path.name + "-wal")
    uri = f"{path.absolute().as_uri()}?mode=ro" + ("" if wal.exists() else "&immutable=1")
    try:
        db = sqlite3.connect(uri, uri=True)
        try:
            rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise ConfigError("bad_db", f"{path} is not a usable SQLite database: {exc}") from None
    return {str(name) for (name,) in rows}


def check_state_dir(path: Path) -> None:
    """Refuse a state directory that ``serve`` could not make or write in.

    Raises:
        ConfigError: ``bad_state_dir``: it (or the folder it would be made in) is not a
            directory, or not writable.
    """
    # The first folder that exists, from the state directory up: where it will be made.
    for folder in (path, *path.absolute().parents):
        try:
            st = os.stat(folder)
        except FileNotFoundError:
            continue
        except OSError as exc:  # a file on the way (ENOTDIR), no permission to look
            raise ConfigError("bad_state_dir", f"{path}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError("bad_state_dir", f"{path}: {folder} is not a directory")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError("bad_state_dir", f"{path}: {folder} is not writable")
        return


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 or later) from PEM files.

    Raises:
        ConfigError: ``tls_unreadable`` (missing, not a regular file, over 1 MiB),
            ``tls_invalid`` (not PEM, or the key does not match the certificate).
    """
    for path in (cert, key):
        # OpenSSL would wait for ever on a FIFO, and read a device without end.
        try:
            st = path.stat()
        except OSError as exc:
            raise ConfigError("tls_unreadable", f"{path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_PEM_BYTES:
            raise ConfigError("tls_unreadable", f"{path} is not a PEM file (at most 1 MiB)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except ssl.SSLError as exc:  # not PEM, or the key does not match the certificate
        raise ConfigError("tls_invalid", f"{cert} / {key}: {exc}") from None
    except OSError as exc:
        raise ConfigError("tls_unreadable", str(exc)) from None
    return context


def image_pinner(logins_file: Path | None, ca_file: Path | None) -> ImagePinner:
    """The pinner of submitted tags, with the registry logins and CA given to ``serve``.

    Raises:
        ConfigError: ``bad_logins_file`` (missing, unsafe, malformed), ``bad_setting``
            (the CA file is not a readable PEM file).
    """
    logins = registry_logins(logins_file)
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError("bad_setting", f"--registry-ca {ca_file}: {exc}") from None
    return ImagePinner(logins=logins, ca_file=ca_file)


def registry_logins(path: Path | None) -> dict[str, Credentials]:
    """The registry logins in ``path`` (none without one).

    Raises:
        ConfigError: ``bad_logins_file`` (missing, unsafe, malformed).
    """
    if path is None:
        return {}
    try:
        return read_logins(path)
    except OciError as exc:
        raise ConfigError(exc.code, exc.detail) from None


def parse_uploads(given: list[str]) -> dict[str, str]:
    """``--upload PATH=URL`` arguments as output path -> URL.

    Raises:
        JobError: ``bad_upload_target`` (no ``=``, an empty side, a path given twice).
    """
    uploads: dict[str, str] = {}
    for text in given:
        path, sep, url = text.partition("=")
        if not sep or not path or not url:
            raise JobError("bad_upload_target", f"--upload {text!r}: give PATH=URL")
        if path in uploads:
            raise JobError("bad_upload_target", f"--upload: {path!r} given twice")
        uploads[path] = url
    return uploads
