"""Run a workload spec in a hardened container, streaming its events, always cleaning up.

``Runner.run`` is an async generator: ``Created``, ``Started``, ``LogChunk``..., ``Exited``
and last ``Finished`` with the :class:`~sandbox.events.JobResult`. Whatever happens (a
failed start, a timeout, a cancel, an exception in the caller), the container, the job's
directories and its cgroup are removed before the generator ends. Containers carry the
job's id in a label, so that what a crash leaves behind is found by :meth:`reap_orphans`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from functools import partial
from pathlib import Path
from typing import Literal

import msgspec

from sandbox.cgroups import JobCgroup
from sandbox.container import create_body
from sandbox.docker_api import Attachment, DockerClient
from sandbox.engine import Engine
from sandbox.engine_types import ImageInfo, RegistryAuth
from sandbox.errors import EngineError, PullError, RunError, SandboxError
from sandbox.events import (
    Created,
    Event,
    Exited,
    ExitReason,
    Finished,
    JobResult,
    LogChunk,
    Pulled,
    Pulling,
    Started,
)
from sandbox.gpu_mapping import DeviceFacts, HostGroups, host_groups, map_gpus
from sandbox.gvisor import reap_shims
from sandbox.jobdir import JOB_ID, JobDir, runner_instance
from sandbox.joblog import Drain, LogBudget
from sandbox.outputs import collect_outputs
from sandbox.reaper import reap_orphans, remove_cgroup
from sandbox.service_net import close_host, network_config
from sandbox.spec import ImageRef, WorkloadSpec, spec_digest
from sandbox.uids import UidPool, can_give_files_away

__all__ = ["LogBudget", "Runner", "RunnerConfig"]

_WATCH_INTERVAL_S = 0.5


class RunnerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How the runner runs jobs on this machine.

    Attributes:
        jobs_dir: where each job's input and output directories are made (and removed).
        runtime: the OCI runtime (``runc``, or ``runsc`` for gVisor).
        user: the uid:gid every job runs as, overriding the default: when this process
            is root or holds ``uids.FILE_CAPABILITIES`` (the service does), a uid (and
            gid) of the job's own from ``job_uid_base`` on, so that one job cannot exhaust
            what the kernel allows per uid (inotify instances, ...) for the others; else
            this process's own (so that the agent can always delete what a job wrote).
        job_uid_base, job_uids: the range jobs' own uids are taken from, as many as
            ``job_uids``; no two live jobs of this runner share one.
        log_max_bytes: output kept and forwarded per job; the rest is counted and dropped.
        log_rate_bytes_per_s: sustained output forwarded per second, with a burst of as much.
        log_drain_bytes_per_s: output read from the engine per second at most, kept or
            not: what the host spends copying a job's output is bounded by it, and a job
            that writes faster waits on its full pipe.
        cgroup_root: where the cgroup file systems are mounted.

    An image that is not on the host is pulled when the spec pins it by digest
    (``repository@sha256:...``); a tag is never pulled (:func:`_pullable`).
    """

    jobs_dir: Path
    runtime: str = "runc"
    user: str | None = None
    job_uid_base: int = 200_000
    job_uids: int = 65_536
    log_max_bytes: int = 1 << 20
    log_rate_bytes_per_s: int = 256 << 10
    log_drain_bytes_per_s: int = 1 << 20
    cgroup_root: Path = Path("/sys/fs/cgroup")
    registry_auth: dict[str, RegistryAuth] = {}
    """Credentials per registry host (``registry.example.com:5000``) for image pulls."""
    pull_idle_timeout_s: float = 120.0
    """A pull that makes no progress for this long fails ``pull_timeout``."""
    max_image_unpacked_bytes: int | None = None
    """The largest image pulled, unpacked (as the engine counts it once pulled): a larger
    one is removed again and fails ``image_too_large``; None: any."""


class Runner:
    """Runs jobs on one Docker engine."""

    def __init__(self, client: DockerClient, config: RunnerConfig) -> None:
        self.engine = Engine(client)
        self.config = config
        self._cancels: dict[str, asyncio.Event] = {}
        self.instance = runner_instance()
        # None: each job gets a uid of its own (see RunnerConfig.user).
        self.user = config.user or (
            None if can_give_files_away() else f"{os.getuid()}:{os.getgid()}"
        )
        self._uids = UidPool(config.job_uid_base, config.job_uids)
        self._cgroup_driver = "cgroupfs"
        self._cdi = False
        self._services = True
        self._groups = HostGroups(video_gid=None, render_gid=None)

    async def prepare(self) -> list[str]:
        """Learn the engine's setup and reap what an earlier run left; return reaped ids."""
        info = await self.engine.info()
        self._cgroup_driver = info.cgroup_driver
        self._cdi = self.engine.supports_cdi(info)
        if self.config.runtime not in (info.runtimes or {}):
            raise RunError("runtime_missing", f"the engine has no runtime {self.config.runtime!r}")
        self._groups = host_groups()
        # gVisor's own network stack off: a service's address would lead nowhere.
        self._services = "--network=none" not in info.runtime_args(self.config.runtime)
        return await self.reap_orphans()

    async def reap_orphans(self) -> list[str]:
        """Remove what runners that are gone left behind: containers, directories, cgroups,
        gVisor sandboxes. A live runner's jobs (another process) are left alone."""
        return await reap_orphans(
            self.engine,
            jobs_dir=self.config.jobs_dir,
            cgroup_root=self.config.cgroup_root,
            cgroup_driver=self._cgroup_driver,
            running=self._cancels,
        )

    def cancel(self, job_id: str) -> bool:
        """Ask a running job to stop (SIGTERM, its grace period, SIGKILL); False if unknown."""
        event = self._cancels.get(job_id)
        if event is None:
            return False
        event.set()
        return True

    async def run(
        self,
        job_id: str,
        spec: WorkloadSpec,
        gpus: list[DeviceFacts],
        fetched: Mapping[str, Path] | None = None,
        *,
        keep_outputs: Path | None = None,
        registry_auth: RegistryAuth | None = None,
    ) -> AsyncGenerator[Event, None]:
        """Run ``spec`` on exactly ``gpus``; yield its events, the last one ``Finished``.

        ``fetched`` maps the path of each input the spec gives by URL to the host file
        that holds it (the caller fetched and checked it); each is mounted read-only.
        ``keep_outputs``, an existing empty directory, receives a copy of each collected
        output file (``<index in spec.outputs>``), made from the reads that hashed it: the
        job directory is removed when the job ends, what is kept there is not.
        ``registry_auth``, a login to the image's registry for this job alone (one its
        offer carried), goes before the configured one for that registry.

        Iterate it under ``contextlib.aclosing``: a caller that stops early then still
        gets the container stopped and removed at once, not whenever the generator is
        garbage-collected.
        """
        if not JOB_ID.fullmatch(job_id):
            raise RunError("bad_job_id", f"job id {job_id!r} is not 1-64 of [A-Za-z0-9_.-]")
        if job_id in self._cancels:
            raise RunError("job_running", f"job {job_id} is already running")
        cancel = self._cancels[job_id] = asyncio.Event()
        result = JobResult(
            job_id=job_id,
            reason="error",
            exit_code=None,
            image_id=None,
            spec_digest=spec_digest(spec),
            log_sha256=hashlib.sha256().hexdigest(),
        )
        job_dir = JobDir(self.config.jobs_dir, job_id)
        cgroup = JobCgroup(job_id, self._cgroup_driver, self.config.cgroup_root)
        container_id: str | None = None
        uid: int | None = None
        network: str | None = None
        try:
            if self.user is None:
                uid = self._uids.take()
            # The canonical name: a bare "abc123" must not resolve as an image-id prefix.
            ref = spec.image_ref
            try:
                image = await self.engine.inspect_image(ref.canonical)
            except EngineError as exc:
                if exc.code != "image_not_found" or not _pullable(ref):
                    raise
                async with aclosing(self._pull(ref, registry_auth)) as pulling:
                    async for progress in pulling:
                        yield progress
                image = await self._pulled(ref)
                yield Pulled(f"{ref.repository}@{ref.digest}", image.id, image.size)
            result.image_id = image.id  # a tag pinned to the image it names now
            job_dir.create(self.instance)
            mounts = job_dir.mounts(spec, fetched)
            if uid is not None and mounts.output_dir is not None:
                os.chown(mounts.output_dir, uid, uid)
            if spec.kind == "service":
                if not self._services:
                    raise RunError(
                        "service_runtime_unsupported",
                        f"the runtime {self.config.runtime} runs with --network=none here:"
                        " a service in it could not be reached",
                    )
                await close_host()
                made = network_config(job_id, self.instance)
                await self.engine.create_network(made)
                network = made.name
            config = create_body(
                job_id=job_id,
                network=network,
                spec=spec,
                image_id=result.image_id,
                gpus=map_gpus(gpus, cdi=self._cdi, groups=self._groups),
                mounts=mounts,
                user=self.user or f"{uid}:{uid}",
                runtime=self.config.runtime,
                cgroup_parent=cgroup.parent,
                runner=self.instance,
                image_volumes=image.volumes,
            )
            container_id = await self.engine.create(f"gpu-agent-{job_id}", config)
            job_dir.record_container(container_id)
            if volumes := (await self.engine.inspect(container_id)).volumes:
                # Every image volume should be a capped tmpfs: a volume is unbounded host disk.
                raise RunError("bad_image_volume", f"the engine made volumes at {volumes}")
            yield Created(container_id)
            execution = self._execute(
                container_id, spec, cancel, result, job_dir=job_dir, network=network
            )
            async with aclosing(execution) as events:
                async for event in events:
                    yield event
            if mounts.output_dir is not None and result.error_code is None:
                # The watch looks every _WATCH_INTERVAL_S: a job that overflows and exits
                # between two looks is caught here, before anything is hashed.
                overflow = await asyncio.to_thread(job_dir.output_overflow, spec.output_max_bytes)
                if overflow is not None:
                    result.reason, result.error_code, result.detail = (
                        "failed",
                        "output_limit",
                        overflow,
                    )
            if mounts.output_dir is not None and result.error_code is None:
                # Hashing up to output_max_bytes must not stall the event loop.
                result.outputs = await asyncio.to_thread(
                    collect_outputs,
                    mounts.output_dir,
                    spec.outputs,
                    spec.output_max_bytes,
                    keep_outputs,
                )
            usage = cgroup.usage()
            result.cpu_seconds = usage.cpu_seconds
            result.peak_memory_bytes = usage.peak_memory_bytes
        except SandboxError as exc:
            result.reason, result.error_code, result.detail = "error", exc.code, exc.detail
        except (OSError, KeyError, TypeError) as exc:  # the host
            result.reason, result.error_code, result.detail = "error", "internal", repr(exc)
        finally:
            # Labelled: what cannot be removed, the next start's reap_orphans() finds.
            removed = container_id is None or await self.engine.remove(container_id)
            if container_id is not None and removed and result.error_code == "start_failed":
                # The runtime's shim can outlive a container whose start failed (runsc).
                await asyncio.to_thread(reap_shims, [container_id])
            if uid is not None and removed:
                # A container that could not be removed may still run as this uid.
                self._uids.release(uid)
            if network is not None and removed:
                await self.engine.remove_network(network)
            job_dir.remove()
            await remove_cgroup(cgroup)
            # Last: until everything above is gone, the same job id cannot start again.
            del self._cancels[job_id]
        yield Finished(result)

    async def prefetch(self, ref: ImageRef) -> Pulled | None:
        """Pull ``ref`` now unless the engine has it (a job will want it soon); what was
        pulled, or None when nothing was.

        Raises:
            PullError: as a job's pull; ``image_not_pinned`` for a tag or a local id.
        """
        if not _pullable(ref):
            raise PullError("image_not_pinned", f"{ref.canonical}: only name@sha256:... is pulled")
        try:
            await self.engine.inspect_image(ref.canonical)
        except EngineError as exc:
            if exc.code != "image_not_found":
                raise
        else:
            return None
        async with aclosing(self._pull(ref)) as pulling:
            async for _ in pulling:
                pass
        image = await self._pulled(ref)
        return Pulled(f"{ref.repository}@{ref.digest}", image.id, image.size)

    async def _pulled(self, ref: ImageRef) -> ImageInfo:
        """The image just pulled under ``ref``: that digest, within the unpacked cap (a
        larger one is removed again: the disk is the owner's)."""
        image = await self.engine.inspect_image(ref.canonical)
        _check_pulled(ref, image)
        cap = self.config.max_image_unpacked_bytes
        if cap is not None and image.size > cap:
            await self.engine.remove_image(image.id)
            raise PullError(
                "image_too_large", f"{ref.canonical}: {image.size} > {cap} bytes unpacked"
            )
        return image

    async def _pull(
        self, ref: ImageRef, auth: RegistryAuth | None = None
    ) -> AsyncGenerator[Pulling, None]:
        """Pull a pinned image, yielding each layer's progress as the engine reports it;
        with ``auth``, else the configured login of its registry."""
        assert ref.repository is not None
        registry = ref.repository.split("/", 1)[0]
        progress: asyncio.Queue[Pulling | None] = asyncio.Queue()
        pull = asyncio.create_task(
            self.engine.pull(
                f"{ref.repository}@{ref.digest}",
                auth=auth or self.config.registry_auth.get(registry),
                idle_timeout_s=self.config.pull_idle_timeout_s,
                on_progress=lambda layer, done, total: progress.put_nowait(
                    Pulling(layer, done, total)
                ),
            )
        )
        pull.add_done_callback(lambda _: progress.put_nowait(None))
        try:
            while (event := await progress.get()) is not None:
                yield event
            await pull  # its error, if it failed
        finally:
            pull.cancel()

    async def _execute(
        self,
        container_id: str,
        spec: WorkloadSpec,
        cancel: asyncio.Event,
        result: JobResult,
        *,
        job_dir: JobDir,
        network: str | None,
    ) -> AsyncGenerator[Event, None]:
        """Start the container, stream its output, stop it on timeout, cancel or overflow."""
        # Attached before the start, so that no output is missed; the wait is registered
        # before the start, so that an exit at once is not missed.
        async with self.engine.attach(container_id) as attached:
            exited = await self.engine.arm_wait(container_id)
            waiting: asyncio.Task[object] = asyncio.create_task(exited())
            try:
                await self.engine.start(container_id)
            except RunError:
                waiting.cancel()
                raise
            started = time.time()
            address = ""
            if network is not None:  # a service: where the agent reaches it
                address = (await self.engine.inspect(container_id)).address(network)
            yield Started(started, address)
            watch = (
                partial(job_dir.output_overflow, spec.output_max_bytes) if spec.outputs else None
            )
            stopping = asyncio.create_task(
                self._supervise(container_id, spec, cancel, waiting, watch=watch, result=result)
            )
            budget = LogBudget(self.config.log_max_bytes, self.config.log_rate_bytes_per_s)
            queue: asyncio.Queue[LogChunk | None] = asyncio.Queue()
            pump = asyncio.create_task(self._pump_output(attached, budget, queue))
            try:
                while (chunk := await queue.get()) is not None:
                    yield chunk
                stopped_by = await stopping
            finally:
                for task in (pump, stopping, waiting):
                    task.cancel()
        result.log_sha256 = budget.digest.hexdigest()
        result.log_bytes, result.log_dropped_bytes = budget.kept, budget.dropped
        result.log_truncated = budget.truncated
        state = (await self.engine.inspect(container_id)).state
        result.exit_code = state.exit_code
        result.started_at, result.finished_at = state.started, state.finished
        if result.started_at is not None and result.finished_at is not None:
            # Docker stamps StartedAt after runc reports the start; a process that is done
            # by then gets a FinishedAt before its StartedAt.
            result.finished_at = max(result.finished_at, result.started_at)
        result.reason = stopped_by or _reason(result.exit_code, state.oom_killed)
        yield Exited(result.exit_code, result.reason)

    async def _supervise(
        self,
        container_id: str,
        spec: WorkloadSpec,
        cancel: asyncio.Event,
        waiting: asyncio.Task[object],
        *,
        watch: Callable[[], str | None] | None,
        result: JobResult,
    ) -> ExitReason | None:
        """Wait for the exit; on timeout, cancel or an overflowing /output, stop the
        container and say which it was."""
        loop = asyncio.get_running_loop()
        # A service runs until its lease ends, which its supervisor keeps: no timeout here.
        deadline = loop.time() + spec.timeout_s if spec.kind == "batch" else math.inf
        cancelled = asyncio.create_task(cancel.wait())
        reason: ExitReason | None = None
        try:
            while reason is None:
                remaining = deadline - loop.time()
                wait = min(remaining, _WATCH_INTERVAL_S) if watch else remaining
                done, _ = await asyncio.wait(
                    {waiting, cancelled},
                    timeout=None if math.isinf(wait) else wait,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if waiting in done and waiting.exception() is None:
                    return None
                if cancelled in done:
                    reason = "cancelled"
                elif waiting in done or loop.time() >= deadline:
                    # A wait that failed (the engine restarted) proves nothing: stop it.
                    reason = "timeout" if waiting not in done else "error"
                elif watch is not None and (overflow := await asyncio.to_thread(watch)):
                    reason, result.error_code, result.detail = "failed", "output_limit", overflow
        finally:
            cancelled.cancel()
        # A job past a limit gets no grace: it would spend it going on past the limit
        # (writing, say, another 100 MiB while ignoring SIGTERM). Cancel and timeout are
        # the job's due end, and it may save its work.
        if not (result.error_code is not None and await self.engine.kill(container_id)):
            # Not killed (it had stopped by itself, or the engine failed), or not to be:
            # its stop signal (SIGTERM), its grace, then SIGKILL.
            await self.engine.stop(container_id, spec.grace_s)
        with contextlib.suppress(EngineError):
            await waiting
        return reason

    async def _pump_output(
        self, attached: Attachment, budget: LogBudget, queue: asyncio.Queue[LogChunk | None]
    ) -> None:
        """Forward what the budget keeps; read it all, but no faster than the drain rate.

        Past the budget, the output is still read (and dropped): a job that goes on
        printing, say, a long training run's progress, must not be stalled on its full
        pipe, nor killed for it. Reading at a bounded rate keeps what the host spends on
        it (the shim's and the engine's copies, outside the job's CPU cap) bounded too,
        and the pipe's back-pressure holds a flooding job to that rate.
        """
        drain = Drain(self.config.log_drain_bytes_per_s)
        try:
            async with aclosing(attached.frames()) as frames:
                async for stream, data in frames:
                    if kept := budget.admit(data):
                        name: Literal["stdout", "stderr"] = (
                            "stderr" if stream == "stderr" else "stdout"
                        )
                        await queue.put(LogChunk(name, kept))
                    if (pause := drain.delay(len(data))) > 0:
                        await asyncio.sleep(pause)
        finally:
            queue.put_nowait(None)


def _reason(exit_code: int, oom_killed: bool) -> ExitReason:
    if oom_killed:
        return "oom_killed"
    return "completed" if exit_code == 0 else "failed"


def _pullable(ref: ImageRef) -> bool:
    """Whether the engine may pull ``ref``: by digest from a repository, never a movable
    tag (what runs must be what was signed) nor a bare local image id."""
    return ref.repository is not None and ref.digest is not None


def _check_pulled(ref: ImageRef, image: ImageInfo) -> None:
    """The image the engine now has under ``ref`` is the one pulled by its digest."""
    if not any(name.endswith(f"@{ref.digest}") for name in image.repo_digests or []):
        raise PullError("digest_mismatch", f"{ref.canonical}: the engine has {image.id}")
