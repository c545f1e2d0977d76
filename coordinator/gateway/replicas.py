"""The replicas the gateway may route to now, read from the store at each request.

A replica is a job of kind ``service`` in state ``ready`` whose node's data connection is
up. A job's state changes as its node reports it, so the view is read afresh for each
request (one indexed query); the spec of a job never changes, so its ``[service]`` table
is parsed once and kept while the job lives.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import msgspec

from coordinator.gateway.routing import Replica
from coordinator.gateway.tables import ServiceJobs
from sandbox.spec import ServiceSpec

__all__ = ["Catalogue", "ReplicaView"]


class Catalogue(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway can route to now."""

    ready: list[Replica]
    models: frozenset[str]
    """Every model a live service job names, ready or not (else: ``model_not_found``)."""


class _Service(msgspec.Struct, frozen=True):
    kind: str = "job"
    service: ServiceSpec | None = None


class ReplicaView:
    """Ready replicas from the store's live jobs and the nodes with a data connection:
    here (``connected``), or on another coordinator on the store (``elsewhere``: node ->
    that coordinator's gateway, asked only for nodes that have none here)."""

    def __init__(
        self,
        jobs: ServiceJobs,
        connected: Callable[[], Collection[str]],
        elsewhere: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self._jobs = jobs
        self._connected = connected
        self._elsewhere = elsewhere
        self._specs: dict[str, ServiceSpec | None] = {}

    def current(self) -> Catalogue:
        """The ready replicas and the known models, now."""
        rows = self._jobs.live()
        connected = self._connected()
        specs = {row.job_id: self._spec(row.job_id, row.spec) for row in rows}
        # Only the live jobs' specs are kept: the cache is as large as the live set.
        self._specs = specs
        remote: Mapping[str, str] = {}
        if self._elsewhere is not None and any(
            r.state == "ready" and r.node_id not in connected for r in rows
        ):
            remote = self._elsewhere()
        ready: list[Replica] = []
        models: set[str] = set()
        for row in rows:
            spec = specs[row.job_id]
            if spec is None:
                continue
            models.update(spec.models)
            here = row.node_id in connected
            if row.state == "ready" and (here or row.node_id in remote):
                ready.append(
                    Replica(
                        job_id=row.job_id,
                        node_id=row.node_id,
                        models=tuple(spec.models),
                        max_streams=spec.max_streams,
                        via="" if here else remote[row.node_id],
                    )
                )
        return Catalogue(ready=ready, models=frozenset(models))

    def _spec(self, job_id: str, text: str) -> ServiceSpec | None:
        if job_id in self._specs:
            return self._specs[job_id]
        try:
            parsed = msgspec.json.decode(text, type=_Service)
        except msgspec.DecodeError:
            return None  # not a service (or a spec of some other shape): never routed to
        return parsed.service if parsed.kind == "service" else None
