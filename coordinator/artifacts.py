"""The coordinator's artifact store: the outputs nodes PUT, kept by content on disk.

A job's offer names, for each declared output without a target of the submitter's, a URL
on the coordinator's artifact listener (:class:`coordinator.admin.AdminListener` with a
stream handler, bound where agents reach the coordinator, TLS when it has TLS)::

    PUT /artifacts/<job id>?path=<output path>&token=<token>

The token (:mod:`coordinator.artifact_tokens`) binds job, path and expiry. The body is
copied to ``artifacts/tmp/`` while hashed, then renamed to ``artifacts/sha256/<hex>``; the
index (``artifacts/index.db``) records (job, path) -> digest, size, node. Caps: the job's
``output_max_bytes`` for its outputs together, ``node_max_bytes`` for everything stored of
one node's jobs. What was stored is compared with the receipt's digests by
:func:`output_problems`.

Retention (:meth:`ArtifactStore.retain`, run by the coordinator's retention pass) removes
the outputs of jobs that ended long enough ago. It first marks their index rows expired
(one committed transaction), then removes every object file no live row names: a pass
cut short leaves at worst objects nobody needs, which the next pass finds and removes,
never a live row without its object. An expired output answers 410 ``output_expired``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final, NamedTuple
from urllib.parse import quote

import msgspec

from agent.protocol.uploads import UploadTarget
from coordinator.admin import content_length
from coordinator.api_util import HttpAnswer, HttpRequest, coded_error, json_answer, split_target
from coordinator.artifact_tokens import SECRET_BYTES, sign_token, verify_token
from coordinator.errors import JobError
from coordinator.jobs_store import JobRow
from sandbox.errors import SandboxError
from sandbox.spec import load_spec

__all__ = ["ArtifactStore", "JobOutputs", "Retained", "Stored", "job_outputs", "output_problems"]

_log = logging.getLogger(__name__)
_CHUNK: Final = 1 << 20
#: A PUT that sends nothing for this long is dropped.
_IDLE_S: Final = 60.0
_SECRET_FILE: Final = "artifacts.key"


class JobOutputs(NamedTuple):
    """What the store needs to know of a job to take its outputs."""

    node_id: str
    outputs: list[str]
    max_bytes: int


class Stored(NamedTuple):
    """One output as stored."""

    sha256: str
    size_bytes: int


class Retained(NamedTuple):
    """What one retention pass removed."""

    outputs: int
    """(job, path) rows marked expired."""
    files: int
    """Object and temporary files deleted (including orphans of an earlier crash)."""


class ArtifactStore:
    """Outputs on disk by digest, and the index of which job's output each one is."""

    def __init__(
        self,
        state_dir: Path,
        *,
        job_of: Callable[[str], JobOutputs | None],
        node_max_bytes: int,
        clock: Callable[[], float],
    ) -> None:
        self.root = state_dir / "artifacts"
        self._job_of = job_of
        self.node_max_bytes = node_max_bytes
        self._clock = clock
        for sub in ("sha256", "tmp"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self._secret = _secret(state_dir / _SECRET_FILE)
        self._db = sqlite3.connect(self.root / "index.db", isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS artifacts (job_id TEXT NOT NULL, path TEXT NOT NULL,"
            " node_id TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,"
            " PRIMARY KEY (job_id, path)) STRICT"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(artifacts)")}
        if "expired" not in columns:  # an index made before retention: every row is live
            self._db.execute("ALTER TABLE artifacts ADD COLUMN expired REAL")
        # Temporary files of PUTs under way: the sweep of ``tmp/`` leaves them alone.
        self._receiving: set[Path] = set()

    def close(self) -> None:
        """Close the index."""
        self._db.close()

    def target(self, base_url: str, job_id: str, path: str, expires: float) -> UploadTarget:
        """Where the node PUTs ``path`` of ``job_id``: this store, with a token."""
        token = sign_token(self._secret, job_id, path, int(expires))
        query = f"path={quote(path, safe='')}&token={token}"
        return UploadTarget(url=f"{base_url}/artifacts/{quote(job_id, safe='')}?{query}")

    def outputs(self, job_id: str) -> dict[str, Stored]:
        """The outputs stored for a job, by path."""
        rows = self._db.execute(
            "SELECT path, sha256, size FROM artifacts WHERE job_id = ? AND expired IS NULL",
            (job_id,),
        ).fetchall()
        return {path: Stored(sha256, size) for path, sha256, size in rows}

    def expired(self, job_id: str) -> dict[str, float]:
        """The outputs of a job removed by retention, by path: when."""
        rows = self._db.execute(
            "SELECT path, expired FROM artifacts WHERE job_id = ? AND expired IS NOT NULL",
            (job_id,),
        ).fetchall()
        return {path: float(when) for path, when in rows}

    def retain(
        self, job_of: Callable[[str], JobRow | None], *, before: float, max_bytes: int | None
    ) -> Retained:
        """Remove the outputs of the jobs that ended (a final state; a job ``job_of`` no
        longer has, long ago) ``before``, then of the oldest other ended jobs while the
        objects of all live outputs together are over ``max_bytes`` (None: no such
        budget); and every file no live output needs (what a crash left behind, an object
        no job shares now)."""
        rows = self._db.execute(
            "SELECT job_id, sha256, size FROM artifacts WHERE expired IS NULL"
        ).fetchall()
        ends = {job_id: _ended_at(job_of(job_id)) for job_id in {row[0] for row in rows}}
        gone = _to_expire(rows, ends, before, max_bytes)
        # The rows first, committed: from here on no GET serves these objects, so deleting
        # them below (or in a later pass, after a crash) takes nothing anybody may read.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            expired = self._db.executemany(
                "UPDATE artifacts SET expired = ? WHERE job_id = ? AND expired IS NULL",
                [(self._clock(), job_id) for job_id in gone],
            ).rowcount
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        if expired:
            _log.info("retention: %d output(s) of %d job(s) expired", expired, len(gone))
        needed = {
            sha256
            for (sha256,) in self._db.execute(
                "SELECT DISTINCT sha256 FROM artifacts WHERE expired IS NULL"
            )
        }
        files = 0
        for directory, keep in (("sha256", needed), ("tmp", {p.name for p in self._receiving})):
            with os.scandir(self.root / directory) as entries:
                unneeded = [entry.path for entry in entries if entry.name not in keep]
            for path in unneeded:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    files += 1
        if files:
            _log.info("retention: %d artifact file(s) deleted", files)
        return Retained(expired, files)

    def file(self, sha256: str) -> Path:
        """Where the object of ``sha256`` lies."""
        return self.root / "sha256" / sha256

    async def receive(self, request: HttpRequest, reader: asyncio.StreamReader) -> HttpAnswer:
        """Take one PUT of the artifact listener."""
        try:
            job_id, path, length, job = self._admit(request)
        except JobError as exc:
            status = HTTPStatus.FORBIDDEN if "token" in exc.code else HTTPStatus.BAD_REQUEST
            if exc.code == "too_large":
                status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            elif exc.code == "output_expired":
                status = HTTPStatus.GONE
            return coded_error(status, exc.code, exc.detail)
        temporary = self.root / "tmp" / secrets.token_hex(16)
        digest = hashlib.sha256()
        self._receiving.add(temporary)
        try:
            with temporary.open("xb") as out:
                left = length
                while left:
                    async with asyncio.timeout(_IDLE_S):
                        chunk = await reader.read(min(_CHUNK, left))
                    if not chunk:
                        raise ConnectionError("the body ended early")
                    digest.update(chunk)
                    out.write(chunk)
                    left -= len(chunk)
                out.flush()
                os.fsync(out.fileno())
            hexdigest = digest.hexdigest()
            if path in self.expired(job_id):  # removed by a retention pass meanwhile
                return _gone(job_id, path)
            before = self.outputs(job_id).get(path)
            if before is not None and before.sha256 != hexdigest:
                # First write wins: a node redoing its PUT sends the same bytes; anything
                # else is not the node's output (and the receipt check would flag it).
                return coded_error(
                    HTTPStatus.CONFLICT, "output_exists", f"{path!r} is stored with other bytes"
                )
            os.replace(temporary, self.file(hexdigest))
        finally:
            self._receiving.discard(temporary)
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        self._db.execute(
            "INSERT OR REPLACE INTO artifacts (job_id, path, node_id, sha256, size)"
            " VALUES (?, ?, ?, ?, ?)",
            (job_id, path, job.node_id, hexdigest, length),
        )
        return json_answer({"sha256": hexdigest, "size_bytes": length}, HTTPStatus.CREATED)

    def _admit(self, request: HttpRequest) -> tuple[str, str, int, JobOutputs]:
        target = split_target(request.target)
        if len(target.parts) != 2 or target.parts[0] != "artifacts":
            raise JobError("bad_request", "PUT /artifacts/<job id>?path=...&token=...")
        job_id = target.parts[1]
        path = target.query.get("path", [""])[0]
        token = target.query.get("token", [""])[0]
        verify_token(self._secret, token, job_id=job_id, path=path, now=self._clock())
        job = self._job_of(job_id)
        if job is None or path not in job.outputs:
            raise JobError("bad_request", f"{path!r} is not an output of job {job_id!r}")
        if path in self.expired(job_id):
            raise JobError("output_expired", f"{path!r} of job {job_id!r} was removed")
        if "content-length" not in request.headers:
            raise JobError("bad_request", "a PUT here carries Content-Length")
        length = content_length(request.headers)  # its form was checked with the head
        stored = self.outputs(job_id)
        others = sum(s.size_bytes for p, s in stored.items() if p != path)
        if others + length > job.max_bytes:
            raise JobError("too_large", f"over the job's output_max_bytes ({job.max_bytes})")
        (node_total,) = self._db.execute(
            "SELECT coalesce(sum(size), 0) FROM artifacts WHERE node_id = ?"
            " AND expired IS NULL AND NOT (job_id = ? AND path = ?)",
            (job.node_id, job_id, path),
        ).fetchone()
        if node_total + length > self.node_max_bytes:
            raise JobError("too_large", f"over the node's artifact cap ({self.node_max_bytes})")
        return job_id, path, length, job


def output_problems(
    receipt: dict[str, Any], stored: dict[str, Stored], expected: set[str]
) -> list[str]:
    """How what was stored differs from the receipt's output digests, for the outputs
    ``expected`` in this store: ``output_missing:<path>``, ``output_mismatch:<path>``."""
    problems = []
    for item in receipt.get("outputs", []):
        path = item.get("path")
        if path not in expected or item.get("status") != "ok":
            continue
        got = stored.get(path)
        if got is None:
            problems.append(f"output_missing:{path}")
        elif got.sha256 != item.get("sha256") or got.size_bytes != item.get("size_bytes"):
            problems.append(f"output_mismatch:{path}")
    return problems


def _ended_at(job: JobRow | None) -> float | None:
    """When a job ended (None: it runs still); a job the store no longer has, long ago."""
    if job is None:
        return 0.0
    return job.updated if job.final else None


def _to_expire(
    rows: list[tuple[str, str, int]],
    ends: dict[str, float | None],
    before: float,
    max_bytes: int | None,
) -> list[str]:
    """The jobs whose outputs a pass expires: (job, sha256, size) ``rows`` of live outputs,
    each job's end (None: still running, never expired)."""
    ended = sorted((end, job_id) for job_id, end in ends.items() if end is not None)
    gone = [job_id for end, job_id in ended if end < before]
    if max_bytes is None:
        return gone
    # An object counts once however many outputs share it, until none of them is live.
    holders: dict[str, set[str]] = {}
    sizes: dict[str, int] = {}
    for job_id, sha256, size in rows:
        holders.setdefault(sha256, set()).add(job_id)
        sizes[sha256] = size
    blobs: dict[str, set[str]] = {}
    for sha256, jobs in holders.items():
        for job_id in jobs:
            blobs.setdefault(job_id, set()).add(sha256)
    total = sum(sizes.values())

    def drop(job_id: str) -> None:
        nonlocal total
        for sha256 in blobs.get(job_id, ()):
            holders[sha256].discard(job_id)
            if not holders[sha256]:
                total -= sizes[sha256]

    for job_id in gone:
        drop(job_id)
    for end, job_id in ended:  # the oldest first
        if total <= max_bytes:
            break
        if end >= before:
            drop(job_id)
            gone.append(job_id)
    return gone


def _gone(job_id: str, path: str) -> HttpAnswer:
    return coded_error(HTTPStatus.GONE, "output_expired", f"{path!r} of job {job_id!r} was removed")


def job_outputs(job: JobRow | None) -> JobOutputs | None:
    """What the store needs of a stored job (None: no such job, or its spec is unusable)."""
    if job is None:
        return None
    try:
        spec = load_spec(msgspec.json.encode(job.spec), "json")
    except SandboxError:
        return None
    return JobOutputs(job.node_id, list(spec.outputs), spec.output_max_bytes)


def _secret(path: Path) -> bytes:
    """The HMAC secret in ``path`` (mode 0600), made at the first start."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        data = path.read_bytes()
        if len(data) != SECRET_BYTES:
            raise JobError("bad_token", f"{path}: not a {SECRET_BYTES}-byte secret") from None
        return data
    secret = secrets.token_bytes(SECRET_BYTES)
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    return secret
