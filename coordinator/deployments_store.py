"""Deployments in the store: each one's spec and replica count, and its replicas' jobs.

A replica row names a job of ``jobs`` (its state is the job's); ``retired`` is set once the
reconciler gave up on it (:mod:`coordinator.reconcile`). Only the newest
:data:`KEEP_RETIRED` retired replicas of a deployment are kept, for the record; undeploy
deletes the deployment and its rows.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from coordinator.db import Database

__all__ = [
    "KEEP_RETIRED",
    "SCHEMA",
    "DeploymentRow",
    "DeploymentTable",
    "ReplicaRow",
]

#: Retired replicas kept per deployment (the newest): the record of what went wrong.
KEEP_RETIRED: Final = 20

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    replicas INTEGER NOT NULL,
    lease_s REAL NOT NULL,
    created REAL NOT NULL,
    failures INTEGER NOT NULL DEFAULT 0,
    hold_until REAL NOT NULL DEFAULT 0,
    registry_logins TEXT NOT NULL DEFAULT '{}'
) STRICT;
CREATE TABLE IF NOT EXISTS deployment_replicas (
    job_id TEXT PRIMARY KEY REFERENCES jobs(job_id),
    deployment TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,
    node_id TEXT NOT NULL,
    created REAL NOT NULL,
    renewed_until REAL NOT NULL,
    retired REAL,
    retired_code TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX IF NOT EXISTS replicas_by_deployment ON deployment_replicas (deployment, retired);
"""


class DeploymentRow(msgspec.Struct, frozen=True, kw_only=True):
    """One deployment as stored."""

    name: str
    spec: dict[str, Any]
    replicas: int
    lease_s: float
    created: float
    failures: int
    hold_until: float
    registry_logins: dict[str, Any] = {}
    """Registry host -> ``{"username", "password"}``: the login each replica's offer
    carries for the node's pull of a private image (never shown by the API)."""


class ReplicaRow(msgspec.Struct, frozen=True, kw_only=True):
    """One replica, with its job's state and code."""

    job_id: str
    node_id: str
    created: float
    renewed_until: float
    retired: float | None
    retired_code: str
    state: str
    code: str


class DeploymentTable:
    """The ``deployments`` and ``deployment_replicas`` tables."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(
        self,
        name: str,
        spec: dict[str, Any],
        replicas: int,
        lease_s: float,
        now: float,
        *,
        registry_logins: dict[str, Any] | None = None,
    ) -> bool:
        """Store a new deployment; False if one of that name exists."""
        logins = msgspec.json.encode(registry_logins or {}).decode()
        cursor = self._db.execute(
            "INSERT INTO deployments (name, spec, replicas, lease_s, created, registry_logins)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
            (name, msgspec.json.encode(spec).decode(), replicas, lease_s, now, logins),
        )
        return cursor.rowcount == 1

    def get(self, name: str) -> DeploymentRow | None:
        """One deployment, or None."""
        row = self._db.execute(f"SELECT {_COLUMNS} FROM deployments WHERE name = ?", (name,))
        found = row.fetchone()
        return None if found is None else _deployment(found)

    def all(self) -> list[DeploymentRow]:
        """Every deployment, by name."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM deployments ORDER BY name")
        return [_deployment(r) for r in rows]

    def delete(self, name: str) -> None:
        """Forget a deployment and its replicas (their jobs stay)."""
        with self._db.transaction():
            self._db.execute("DELETE FROM deployment_replicas WHERE deployment = ?", (name,))
            self._db.execute("DELETE FROM deployments WHERE name = ?", (name,))

    def set_replicas(self, name: str, replicas: int) -> bool:
        """Change how many replicas a deployment wants; False if there is no such one."""
        cursor = self._db.execute(
            "UPDATE deployments SET replicas = ? WHERE name = ?", (replicas, name)
        )
        return cursor.rowcount == 1

    def set_hold(self, name: str, failures: int, hold_until: float) -> None:
        """Record a deployment's failures in a row and its hold."""
        self._db.execute(
            "UPDATE deployments SET failures = ?, hold_until = ? WHERE name = ?",
            (failures, hold_until, name),
        )

    def add_replica(self, name: str, job_id: str, node_id: str, now: float, until: float) -> None:
        """Record a replica just placed (its job submitted), its lease running to ``until``."""
        self._db.execute(
            "INSERT INTO deployment_replicas (job_id, deployment, node_id, created, renewed_until)"
            " VALUES (?, ?, ?, ?, ?)",
            (job_id, name, node_id, now, until),
        )

    def renewed(self, job_id: str, until: float) -> None:
        """Record a renewal of a replica's lease."""
        self._db.execute(
            "UPDATE deployment_replicas SET renewed_until = ? WHERE job_id = ?", (until, job_id)
        )

    def retire(self, name: str, job_id: str, code: str, now: float) -> None:
        """Retire a replica with ``code``; forget the deployment's oldest retired past
        :data:`KEEP_RETIRED`."""
        with self._db.transaction():
            self._db.execute(
                "UPDATE deployment_replicas SET retired = ?, retired_code = ?"
                " WHERE job_id = ? AND retired IS NULL",
                (now, code, job_id),
            )
            self._db.execute(
                "DELETE FROM deployment_replicas WHERE deployment = ? AND job_id IN ("
                " SELECT job_id FROM deployment_replicas WHERE deployment = ?"
                " AND retired IS NOT NULL ORDER BY retired DESC LIMIT -1 OFFSET ?)",
                (name, name, KEEP_RETIRED),
            )

    def replicas(self, name: str, *, retired: bool = False) -> list[ReplicaRow]:
        """A deployment's live replicas (or its retired ones, newest first)."""
        where = "r.retired IS NOT NULL" if retired else "r.retired IS NULL"
        order = "r.retired DESC" if retired else "r.created, r.job_id"
        rows = self._db.execute(
            "SELECT r.job_id, r.node_id, r.created, r.renewed_until, r.retired, r.retired_code,"
            " j.state, j.code FROM deployment_replicas r JOIN jobs j ON j.job_id = r.job_id"
            f" WHERE r.deployment = ? AND {where} ORDER BY {order}",
            (name,),
        )
        return [
            ReplicaRow(
                job_id=r[0],
                node_id=r[1],
                created=r[2],
                renewed_until=r[3],
                retired=r[4],
                retired_code=r[5],
                state=r[6],
                code=r[7],
            )
            for r in rows
        ]


_COLUMNS = "name, spec, replicas, lease_s, created, failures, hold_until, registry_logins"


def _deployment(row: Any) -> DeploymentRow:
    return DeploymentRow(
        name=row[0],
        spec=msgspec.json.decode(row[1]),
        replicas=row[2],
        lease_s=row[3],
        created=row[4],
        failures=row[5],
        hold_until=row[6],
        registry_logins=msgspec.json.decode(row[7]),
    )
