"""Finding what runners that are gone left behind, and removing it.

A runner killed mid-job (or with the engine) leaves its container, its job directory,
its cgroup parent and, under gVisor, a sandbox or a shim. Each carries the job's id and
the runner instance that owns it, so a later runner removes what belongs to no live one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from pathlib import Path

from sandbox.cgroups import JobCgroup, job_cgroup_keys
from sandbox.container import LABEL_JOB, LABEL_MANAGED, LABEL_RUNNER
from sandbox.engine import Engine
from sandbox.gvisor import reap_sandboxes, reap_shims
from sandbox.jobdir import JOB_ID, instance_alive, leftovers, live_jobs, remove_tree

__all__ = ["reap_orphans", "remove_cgroup"]

_REMOVE_ATTEMPTS = 5
_REMOVE_BACKOFF_S = 0.2
_log = logging.getLogger(__name__)


async def reap_orphans(
    engine: Engine,
    *,
    jobs_dir: Path,
    cgroup_root: Path,
    cgroup_driver: str,
    running: Collection[str],
) -> list[str]:
    """Remove what runners that are gone left behind: containers, directories, cgroups,
    gVisor sandboxes; return what was reaped. A live runner's jobs (another process, or
    ``running`` of this one) are left alone."""
    # The cgroups first: a job's container is made before its cgroup, so a cgroup
    # seen here whose job is in none of the listings below is no live job's.
    cgroups = await asyncio.to_thread(job_cgroup_keys, cgroup_root)
    listed = await engine.containers(LABEL_MANAGED)
    reaped = []
    live = set(running) | await asyncio.to_thread(live_jobs, jobs_dir)
    for container in listed:
        job = container.label(LABEL_JOB)
        if instance_alive(container.label(LABEL_RUNNER)):
            live.add(job)
            continue
        await engine.remove(container.id)
        if JOB_ID.fullmatch(job):
            await remove_cgroup(JobCgroup(job, cgroup_driver, cgroup_root))
        reaped.append(job or container.id)
    # A service's network, once no container is left on it.
    for network in await engine.networks(LABEL_MANAGED):
        if not instance_alive(network.label(LABEL_RUNNER)):
            await engine.remove_network(network.name)
    # Job cgroup parents no container is left in (a runner killed after removing its
    # container, or one that could not remove the cgroup): nothing else removes them.
    for job in sorted(cgroups - live - set(reaped)):
        if not JOB_ID.fullmatch(job):
            continue
        # One attempt each: a leftover this process may not remove must not hold up
        # every start; what a kill has just emptied goes at the next one.
        cgroup = JobCgroup(job, "cgroupfs", cgroup_root)
        if await asyncio.to_thread(cgroup.remove):
            reaped.append(f"cgroup:{job}")
    ours = []
    for leftover in leftovers(jobs_dir):
        if leftover.container_id is not None:
            ours.append(leftover.container_id)
        remove_tree(leftover.path)
    reaped += [f"runsc:{sandbox[:12]}" for sandbox in reap_sandboxes(ours)]
    reaped += [f"shim:{shim[:12]}" for shim in reap_shims(ours)]
    return reaped


async def remove_cgroup(cgroup: JobCgroup) -> None:
    """Remove a job's cgroup parent, retrying while what was killed in it exits."""
    for attempt in range(_REMOVE_ATTEMPTS):
        if await asyncio.to_thread(cgroup.remove):
            return
        await asyncio.sleep(_REMOVE_BACKOFF_S * (attempt + 1))
    _log.warning("could not remove the cgroup %s", cgroup.parent)
