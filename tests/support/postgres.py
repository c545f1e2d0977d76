"""A throwaway PostgreSQL cluster for the tests: one per session, a fresh database per test.

The cluster is Debian's ``postgresql`` (``/usr/lib/postgresql/<n>/bin``), made by initdb in
a folder of its own under /tmp, listening on a unix socket there only (no TCP port), with
fsync off (a test's data outlives no crash of the server). PostgreSQL refuses to run as
root, as the tests do in CI: then it runs as the ``postgres`` user, which owns the folder.
Without PostgreSQL the tests that need it are skipped, unless ``GPU_AGENT_REQUIRE_POSTGRES=1``
(CI sets it): then they fail.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

__all__ = ["PostgresCluster", "find_bin", "postgres_cluster", "postgres_url"]

_REQUIRE = "GPU_AGENT_REQUIRE_POSTGRES"


def find_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


class PostgresCluster:
    """A running cluster: :meth:`create_database` gives each test its own database."""

    def __init__(self, bin_dir: Path, *, durable: bool = False) -> None:
        """Make and start a cluster; ``durable``: with fsync, as a server that keeps what it
        acknowledges runs (a bench's), not the tests' fsync off."""
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="gpu-agent-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._names = itertools.count(1)
        self._run(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-locale", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        options = f"-k {self.root} -c listen_addresses='' -c max_connections=200"
        if not durable:
            options += " -c fsync=off -c full_page_writes=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
            "-w", "start",
        )  # fmt: skip

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self._as, str(self.bin_dir / tool), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            log = self.root / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed: {done.stderr or done.stdout}\n{tail}")

    def url(self, dbname: str) -> str:
        """The URL of one of its databases, over its unix socket."""
        return f"postgresql://postgres@/{dbname}?host={self.socket_dir}"

    def pids(self) -> list[int]:
        """The server's processes: the postmaster and its children."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        return [postmaster, *(p.pid for p in psutil.Process(postmaster).children(recursive=True))]

    def create_database(self) -> str:
        """A new empty database (from ``template0``); its URL."""
        name = f"test_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (immediately: nothing of it is kept) and remove its folder."""
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """The session's cluster (skipped without PostgreSQL, unless CI requires it)."""
    bin_dir = find_bin()
    if bin_dir is None:
        if os.environ.get(_REQUIRE) == "1":
            pytest.fail(f"{_REQUIRE}=1 but no /usr/lib/postgresql/*/bin/postgres")
        pytest.skip("PostgreSQL is not installed (Debian's postgresql)")
    cluster = PostgresCluster(bin_dir)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """A fresh database of the session's cluster: its URL."""
    return postgres_cluster.create_database()
