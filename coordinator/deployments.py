"""Deployments: a service spec kept running as N replicas on the nodes, until undeployed.

:meth:`Deployments.deploy` checks and stores a deployment; the reconciler
(:meth:`Deployments.run`, a task of the coordinator) then makes one pass over every
deployment each interval (:meth:`Deployments.tick`): it reads the store and the open
sessions into :func:`coordinator.reconcile.decide` and carries its plan out through
:class:`coordinator.job_service.JobService`: a replica is a service job submitted to a
node, retired when it ends or its node stays away, renewed while it runs.
:meth:`Deployments.undeploy` cancels every replica and forgets the deployment. One lock
keeps a pass and a deploy or undeploy apart, so no replica is placed for a deployment
being removed.

How long a node has been away is known from this process's own sight of it: after a
restart of the coordinator, the grace of a node that is away starts again (a longer wait,
never a replica replaced early).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Collection
from typing import Any, Final

import msgspec

from agent.protocol.jobs import FINAL_STATES
from coordinator import reconcile
from coordinator.deployments_store import DeploymentRow
from coordinator.errors import JobError
from coordinator.images import ImagePinner
from coordinator.job_service import JobService
from coordinator.keys import CoordinatorKey
from coordinator.offers import make_offer
from coordinator.store import Store
from oci import Credentials
from sandbox.spec import load_spec

__all__ = [
    "DEFAULT_GRACE_S",
    "DEFAULT_INTERVAL_S",
    "MAX_DEPLOYMENTS",
    "MAX_REPLICAS",
    "NAME",
    "Deployments",
]

#: How long a node may be away before its replicas are placed elsewhere, in seconds.
DEFAULT_GRACE_S: Final = 60.0
#: Seconds between two passes of the reconciler.
DEFAULT_INTERVAL_S: Final = 1.0
#: The most replicas of one deployment.
MAX_REPLICAS: Final = 64
#: The most deployments at once: each pass reads every one of them.
MAX_DEPLOYMENTS: Final = 256
#: A deployment's name: lowercase letters, digits, ``.``, ``_``, ``-``; 1-63 characters.
NAME: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
#: How long a replica that failed on a node puts that node last for the deployment.
_FAILED_LATELY_S: Final = 600.0

_log = logging.getLogger(__name__)


class Deployments:
    """Deploy, undeploy, and the reconciler that keeps each deployment's replicas."""

    def __init__(
        self,
        store: Store,
        jobs: JobService,
        key: CoordinatorKey,
        connected: Callable[[], Collection[str]],
        clock: Callable[[], float],
        *,
        pinner: ImagePinner | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        interval_s: float = DEFAULT_INTERVAL_S,
        leads: Callable[[], bool] = lambda: True,
    ) -> None:
        """``connected``: the nodes connected (to any coordinator on the store); ``leads``:
        whether this coordinator's reconciler is the one that runs, of those on the store."""
        self._leads = leads
        self._store = store
        self._jobs = jobs
        self._key = key
        self._connected = connected
        self._clock = clock
        self._pinner = pinner or ImagePinner()
        self.grace_s = grace_s
        self.interval_s = interval_s
        self._away_since: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self.passes = 0
        """Passes made so far (a test waits for the next one)."""

    async def deploy(
        self, name: Any, spec: Any, replicas: Any, registry_logins: Any = None
    ) -> DeploymentRow:
        """Check and store a deployment of ``replicas`` replicas of the service ``spec``;
        the reconciler places them. A tag is pinned to its digest once, here: every replica
        runs the same image. ``registry_logins`` (registry host -> ``{"username",
        "password"}``) pin a private image's tag, and go in each replica's offer for the
        node's pull (as a job's do: :meth:`JobService.submit`).

        Raises:
            JobError: ``bad_name``, ``bad_replicas`` (not an integer in 1..64),
                ``not_a_service``, a code of the spec's check (as :meth:`JobService.submit`),
                the registry's codes of a tag that cannot be pinned, ``deployment_exists``,
                ``too_many_deployments``.
        """
        if not isinstance(name, str) or NAME.fullmatch(name) is None:
            raise JobError("bad_name", f"{name!r}: 1-63 of a-z 0-9 . _ -, from a letter or digit")
        if type(replicas) is not int or not 1 <= replicas <= MAX_REPLICAS:
            raise JobError("bad_replicas", f"{replicas!r}: an integer in 1..{MAX_REPLICAS}")
        if not isinstance(spec, dict) or spec.get("kind") != "service":
            raise JobError("not_a_service", 'a deployment runs a spec of kind = "service"')
        # Checked as a node will, then pinned; the offers are signed at each placement.
        checked = make_offer(
            self._key,
            job_id="job-check",
            node_id="check",
            spec=spec,
            now=self._clock(),
            registry_logins=registry_logins,
        ).offer
        logins = {
            host: Credentials(login.username, login.password)
            for host, login in checked.registry_logins.items()
        }
        pinned = await self._pinner.pin(spec, logins)
        service = load_spec(msgspec.json.encode(pinned), "json").service
        assert service is not None  # a spec of kind service has one
        async with self._lock:
            if len(self._store.deployments.all()) >= MAX_DEPLOYMENTS:
                raise JobError("too_many_deployments", f"at most {MAX_DEPLOYMENTS}; undeploy one")
            if not self._store.deployments.add(
                name,
                pinned,
                replicas,
                service.lease_s,
                self._clock(),
                registry_logins=msgspec.to_builtins(checked.registry_logins),
            ):
                raise JobError("deployment_exists", f"a deployment {name!r} exists")
        self._wake.set()
        row = self._store.deployments.get(name)
        assert row is not None
        return row

    async def scale(self, name: str, replicas: Any) -> DeploymentRow:
        """Change how many replicas a deployment keeps, in place: the reconciler places the
        new ones, or retires those past it (``rebalanced``) once as many as wanted are
        ready without them, so that scaling down never leaves the deployment short.

        Raises:
            JobError: ``bad_replicas`` (not an integer in 1..64), ``unknown_deployment``.
        """
        if type(replicas) is not int or not 1 <= replicas <= MAX_REPLICAS:
            raise JobError("bad_replicas", f"{replicas!r}: an integer in 1..{MAX_REPLICAS}")
        async with self._lock:
            if not self._store.deployments.set_replicas(name, replicas):
                raise JobError("unknown_deployment", f"no deployment {name!r}")
        self._wake.set()
        row = self._store.deployments.get(name)
        assert row is not None
        return row

    async def undeploy(self, name: str) -> list[str]:
        """Cancel every replica of a deployment (reason ``undeploy``) and forget it; the
        ids of the jobs cancelled.

        Raises:
            JobError: ``unknown_deployment``.
        """
        async with self._lock:
            if self._store.deployments.get(name) is None:
                raise JobError("unknown_deployment", f"no deployment {name!r}")
            replicas = self._store.deployments.replicas(name)
            replicas += self._store.deployments.replicas(name, retired=True)
            cancelled = []
            for replica in replicas:
                if replica.state not in FINAL_STATES:
                    await self._cancel(replica.job_id, f"undeploy {name}")
                    cancelled.append(replica.job_id)
            # The cancels are in the nodes' streams (stored) before the rows go.
            self._store.deployments.delete(name)
        return cancelled

    async def run(self) -> None:
        """A pass every interval (sooner after a deploy), until cancelled."""
        while True:
            await self.tick()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)

    async def tick(self) -> None:
        """One pass over every deployment: retire, renew, place (if this coordinator leads)."""
        if not self._leads():
            return
        async with self._lock:
            now = self._clock()
            connected = set(self._connected())
            for node in connected:
                self._away_since.pop(node, None)
            for row in self._store.deployments.all():
                try:
                    await self._reconcile(row, connected, now)
                except Exception:  # said, and tried again at the next pass
                    # A pass that dies silently would leave a deployment unattended.
                    _log.exception("deployment %s: the pass failed", row.name)
            self.passes += 1

    async def _reconcile(self, row: DeploymentRow, connected: set[str], now: float) -> None:
        table = self._store.deployments
        live = table.replicas(row.name)
        for replica in live:
            if replica.node_id not in connected:
                self._away_since.setdefault(replica.node_id, now)
        failed_lately = {
            r.node_id
            for r in table.replicas(row.name, retired=True)
            if r.retired_code != reconcile.NODE_LOST and now - (r.retired or 0.0) < _FAILED_LATELY_S
        }
        plan = reconcile.decide(
            want=row.replicas,
            lease_s=row.lease_s,
            replicas=[
                reconcile.Replica(r.job_id, r.node_id, r.state, r.renewed_until) for r in live
            ],
            eligible=sorted(n for n in connected if self._available(n)),
            connected=connected,
            away_since=self._away_since,
            now=now,
            grace_s=self.grace_s,
            failures=row.failures,
            hold_until=row.hold_until,
            failed_lately=failed_lately,
        )
        for retire in plan.retire:
            _log.info(
                "deployment %s: replica %s retired (%s)", row.name, retire.job_id, retire.code
            )
            table.retire(row.name, retire.job_id, retire.code, now)
            if retire.cancel:
                await self._cancel(retire.job_id, f"deployment {row.name}: replaced")
        for renew in plan.renew:
            await self._jobs.renew(renew.job_id, renew.until)
            table.renewed(renew.job_id, renew.until)
        failures, hold_until = plan.failures, plan.hold_until
        for node in plan.place:
            try:
                job_id = await self._jobs.submit(
                    node, row.spec, registry_logins=row.registry_logins or None
                )
            except JobError as exc:
                # A node forgotten, a registry gone: held back as a failed replica would be.
                _log.warning("deployment %s: placing on %s failed: %s", row.name, node, exc)
                failures += 1
                hold_until = now + reconcile.hold_s(failures)
                break
            _log.info("deployment %s: replica %s placed on %s", row.name, job_id, node)
            table.add_replica(row.name, job_id, node, now, now + row.lease_s)
        if (failures, hold_until) != (row.failures, row.hold_until):
            table.set_hold(row.name, failures, hold_until)

    def _available(self, node_id: str) -> bool:
        """Whether the node says it takes jobs (its newest ``node_status``)."""
        status = self._store.nodes.latest(node_id, "node_status")
        return status is not None and status.body.get("available") is True

    async def _cancel(self, job_id: str, reason: str) -> None:
        try:
            await self._jobs.cancel(job_id, reason)
        except JobError as exc:  # it ended meanwhile: nothing to stop
            _log.info("cancel of %s: %s", job_id, exc.code)
