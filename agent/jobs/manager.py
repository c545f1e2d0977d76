"""Jobs from offer to receipt: verify, admit, schedule, run, report, exactly once.

The job manager is the daemon's driver around the pure parts (offer verification in
:mod:`agent.protocol.jobs`, admission in :mod:`sandbox.policy`, assignment in
:mod:`agent.jobs.scheduler`) and the sandbox runner. Every change of a job is one outbox
transaction holding both the ledger's new state and the messages that report it:

- an offer is answered ``accepted`` (its GPUs reserved) or ``refused`` with a code, in
  the same transaction that records the offer as handled; the container starts only
  once that is on disk, so nothing runs that the coordinator will not hear of;
- inputs given by URL are fetched (or found in the cache) before the container is made;
  one that cannot be had ends the job ``error`` with its code (``input_*``, ``disk_full``);
- ``running``, bounded ``job_log`` chunks, then the signed receipt (``job_result``) and
  the final ``job_status`` together; a job whose offer names upload targets goes through
  ``uploading`` first, and its receipt is signed and sent only once the stores have every
  output (:mod:`agent.jobs.delivery`);
- at start, jobs that a crash cut short are reaped and reported ``interrupted`` with a
  receipt, and never run again: only a new offer (a new job id) runs anything; a job
  that was ``uploading`` resumes its uploads from its spool instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from agent.errors import InputError
from agent.inputs.progress import FetchProgress
from agent.inputs.stage import Inputs
from agent.jobs import machine
from agent.jobs.admission import OfferDesk
from agent.jobs.delivery import Delivery
from agent.jobs.endings import Endings, StopReason
from agent.jobs.gpus import device_facts, memory_full
from agent.jobs.image_cache import ImageCache, Prefetcher
from agent.jobs.images import ImageGate, engine_logins, offer_logins
from agent.jobs.ledger import Ledger
from agent.jobs.logs import LogForwarder
from agent.jobs.machine import (
    ContainerOf,
    Decision,
    ImagePulled,
    ImageUsed,
    PruneLogs,
    Start,
    Upload,
)
from agent.jobs.node import SHUTTING_DOWN, NodeState
from agent.link.identity import Identity
from agent.link.outbox import Outbox
from agent.protocol.messages import ImagePrefetch, JobCancel, JobOffer, ServiceRenew
from agent.services.supervisor import Hooks, ServiceSupervisor
from hal.types import GpuSample
from oci import OciError
from sandbox.engine_types import RegistryAuth
from sandbox.errors import SandboxError
from sandbox.events import Created, Finished, JobResult, LogChunk, Pulled, Pulling, Started
from sandbox.policy import Policy, image_allowed
from sandbox.runner import Runner
from sandbox.spec import WorkloadSpec, spec_digest

__all__ = ["ImageBudget", "JobManager", "StopReason"]

_log = logging.getLogger(__name__)


#: How long a finished job's output stays readable with ``gpu-agent logs``.
_LOG_RETENTION_S = 7 * 86400
#: A quiet job's output still reaches the coordinator this soon.
_LOG_FLUSH_S = 0.25
#: A pull's or a fetch's progress goes to the coordinator at most this often.
_PULL_REPORT_S = 2.0


@dataclass(frozen=True)
class ImageBudget:
    """The pulled images' disk budget: their total, and the engine's disk's free floor."""

    max_bytes: int = 64 << 30
    min_free_bytes: int = 5 << 30


class JobManager:
    """Takes offers and cancels from the link, runs jobs, reports them through the outbox.

    Each event goes through the pure machine (:mod:`agent.jobs.machine`), whose decision
    the manager carries out: one outbox transaction, then the container it names.
    """

    def __init__(
        self,
        *,
        identity: Identity,
        outbox: Outbox,
        runner: Runner,
        policy: Policy,
        node: NodeState,
        trusted_keys: dict[str, bytes],
        wake: Callable[[], None],
        max_concurrent: int = 0,
        inputs: Inputs | None = None,
        images: ImageGate | None = None,
        image_budget: ImageBudget | None = None,
        clock: Callable[[], float] = time.time,
        delivery: Delivery | None = None,
        coordinator_host: str | None = None,
    ) -> None:
        """``coordinator_host``: the host of the coordinator's URL, what ``@coordinator``
        in the policy's ``allowed_upload_hosts`` stands for."""
        self.identity = identity
        self.outbox = outbox
        self.ledger = Ledger(outbox)
        self.runner = runner
        self.policy = policy
        self.node = node
        self.trusted_keys = trusted_keys
        self.wake = wake
        self.max_concurrent = max_concurrent
        self.inputs = inputs
        self.images = images or ImageGate()
        self.clock = clock
        self.delivery = delivery
        """Where outputs wait for upload; None: offers naming upload targets are refused."""
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.gpu_samples: Callable[[], list[GpuSample]] = list
        """The GPUs' latest samples (the daemon's sampler): whether a service's GPU memory
        was full when it died (``gpu_oom``)."""
        self.services: dict[str, ServiceSupervisor] = {}
        """The services running, by job id: where each answers, and whether it is ready."""
        self._states: dict[str, str] = {}
        self._stops: dict[str, StopReason] = {}
        self._containers: dict[str, str] = {}
        self._fetching: dict[str, FetchProgress] = {}
        self.endings = Endings(
            identity=identity,
            ledger=self.ledger,
            node=node,
            delivery=delivery,
            carry_out=self._carry_out,
            state=self._state,
            stops=self._stops,
        )
        budget = image_budget or ImageBudget()
        self.image_cache = ImageCache(
            runner.engine,
            self.ledger,
            self._carry_out,
            max_bytes=budget.max_bytes,
            min_free_bytes=budget.min_free_bytes,
        )
        self._images_in_use: dict[str, str] = {}
        self._pulls: dict[str, dict[str, tuple[int, int]]] = {}
        self.prefetcher = Prefetcher(
            self.image_cache,
            runner,
            self.images,
            allowed=lambda ref: image_allowed(ref, self.policy.allowed_images),
            in_use=lambda: set(self._images_in_use.values()),
        )

        def running() -> int:
            """Jobs holding a slot: an upload holds no slot, no GPU."""
            return len(self.tasks) - (len(delivery.tasks) if delivery else 0)

        self.desk = OfferDesk(
            identity=identity,
            ledger=self.ledger,
            node=node,
            trusted_keys=trusted_keys,
            clock=clock,
            policy=lambda: self.policy,
            limit=lambda: self.max_concurrent,
            running=running,
            delivery=delivery,
            coordinator_host=coordinator_host,
        )

    # -- start -------------------------------------------------------------------------

    async def recover(self) -> list[str]:
        """Reap what a previous run left and report its unfinished jobs ``interrupted``;
        return their ids. Call once, before the link starts."""
        try:
            await self.runner.prepare()  # removes containers of runners that are gone
        except SandboxError as exc:
            # Jobs cannot run; their labelled leftovers are reaped at the next start.
            _log.error("the container engine is not usable: %s", exc)
            self.node.hold("engine_unavailable", f"{exc.code}: {exc.detail}")
        self._carry_out(Decision(rows=(PruneLogs(self.clock() - _LOG_RETENTION_S),)))
        await self.image_cache.trim(in_use=())
        recovered, resumed = [], []
        for record in self.ledger.unfinished():
            upload = self.delivery.resumable(self.ledger, record) if self.delivery else None
            if upload is not None:
                self._states[record.job_id] = "uploading"
                resumed.append(record.job_id)
                self.tasks[record.job_id] = asyncio.create_task(self._resume(upload))
                continue
            self.endings.finish_unrun(
                record, "interrupted", "agent_restarted", "the agent restarted"
            )
            recovered.append(record.job_id)
        if recovered:
            _log.warning("reported %d job(s) cut short as interrupted", len(recovered))
        if self.delivery is not None:
            self.delivery.sweep(resumed)
        return recovered

    # -- the coordinator's messages ----------------------------------------------------

    async def on_offer(self, message: JobOffer) -> None:
        """Accept or refuse one offer, recorded with the offer's seq as handled; an
        accepted job starts once that is on disk."""
        self._carry_out(self.desk.decide(message), handled=message.seq)

    async def on_cancel(self, message: JobCancel) -> None:
        """Stop a job; its final status (``cancelled``) follows when it has stopped."""
        job_id = message.body.job_id
        if not self.stop(job_id, "cancelled"):
            _log.info("cancel for job %s, which is not running", job_id)

    def on_renew(self, message: ServiceRenew) -> None:
        """Extend a running service's lease, to one lease from now at most; a renewal of
        a job that is not a running service (ended, unknown, still pulling) is ignored."""
        job_id, until = message.body.job_id, message.body.lease_until
        service = self.services.get(job_id)
        if service is None:
            _log.info("lease renewal for job %s, which is not a running service", job_id)
            return
        service.renew(min(until, self.clock() + service.service.lease_s))

    async def on_prefetch(self, message: ImagePrefetch) -> None:
        """Pull an image ahead of the jobs that will want it, in the background."""
        self.prefetcher.soon(message.body.image)

    # -- local control -----------------------------------------------------------------

    def stop(self, job_id: str, why: StopReason) -> bool:
        """Stop a running job (SIGTERM, its grace period, SIGKILL); False if not running."""
        if job_id not in self.tasks:
            return False
        self._stops.setdefault(job_id, why)
        if self.delivery is not None and (upload := self.delivery.tasks.get(job_id)):
            if why != "preempted":  # an upload holds no GPU: an owner guard lets it finish
                upload.cancel()
            return True
        if job_id in self._fetching:  # nothing of the job runs yet: stop the fetch itself
            self.tasks[job_id].cancel()
        if (service := self.services.get(job_id)) is not None:
            service.wake()  # between two runs of its server, nothing else would wake it
        self.runner.cancel(job_id)  # False before the runner has it: _run checks _stops
        return True

    def pull_progress(self, job_id: str) -> tuple[int, int] | None:
        """A job's image pull so far: bytes done and in all; None when none is under way."""
        layers = self._pulls.get(job_id)
        if not layers:
            return None
        return sum(d for d, _ in layers.values()), sum(t for _, t in layers.values())

    def fetch_progress(self, job_id: str) -> tuple[int, int] | None:
        """A job's inputs fetched so far: bytes done and in all; None when not fetching."""
        progress = self._fetching.get(job_id)
        return None if progress is None else progress.totals

    def container_ids(self) -> list[str]:
        """The containers of the running jobs."""
        return list(self._containers.values())

    async def drain_services(self, in_flight: Callable[[str], int] = lambda _: 0) -> None:
        """Stop every service once its requests in flight (``in_flight(job_id)``) are done,
        within its spec's grace period: they end ``stopped`` (``drained``)."""
        await asyncio.gather(
            *(
                service.drain(partial(in_flight, job_id))
                for job_id, service in list(self.services.items())
            )
        )

    async def wait_idle(self) -> None:
        """Return once no job runs."""
        while self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def shutdown(self) -> None:
        """Take no more offers; stop every job (reported ``interrupted``) and wait for them."""
        self.node.hold(SHUTTING_DOWN, "the agent is stopping")
        for job_id in list(self.tasks):
            self.stop(job_id, "interrupted")
        await self.prefetcher.close()
        await self.wait_idle()

    # -- carrying out ------------------------------------------------------------------

    def _carry_out(self, decision: Decision, *, handled: int | None = None) -> None:
        """Write a decision's rows and queue its messages in one transaction (with the
        coordinator message that caused it recorded as handled), then start its job."""
        if decision.rows or decision.messages or handled is not None:
            self.outbox.append_many(
                decision.messages,
                self.clock(),
                coordinator_seq=handled,
                also=self.ledger.write(decision.rows, self.clock()) if decision.rows else None,
            )
        if decision.messages:
            self.wake()
        for row in decision.rows:
            if isinstance(row, machine.NewJob | machine.Transition):
                self._states[row.job_id] = row.state
        if decision.discard is not None and self.delivery is not None:
            self.delivery.discard(decision.discard)
        if decision.start is not None:
            self._start(decision.start)

    def _start(self, start: Start) -> None:
        self.tasks[start.job_id] = asyncio.create_task(self._run(start))
        self.node.changed()

    async def _run(self, start: Start) -> None:
        job_id, spec, units = start.job_id, start.spec, list(start.units)
        logs = LogForwarder(job_id, self._carry_out)
        flusher = asyncio.create_task(logs.flush_every(_LOG_FLUSH_S))
        result: JobResult | None = None
        keep: Path | None = None
        if start.offer.uploads and self.delivery is not None:
            keep = self.delivery.spool(job_id)
        try:
            async with AsyncExitStack() as held:
                fetched = await self._fetch(job_id, spec, held)
                if job_id not in self._stops:
                    logins = offer_logins(start.offer)
                    # Size and signature, at its registry.
                    await self.images.check(spec.image_ref, logins)
                    if (cached := _cache_key(spec)) is not None:
                        self._images_in_use[job_id] = cached
                        self._carry_out(Decision(rows=(ImageUsed(cached),)))
                    auth = next(iter(engine_logins(logins).values()), None)
                    if spec.kind == "service":
                        result = await self._serve(job_id, spec, units, fetched, logs, auth=auth)
                    else:
                        result = await self._follow(
                            job_id, spec, units, fetched, logs, keep=keep, auth=auth
                        )
        except InputError as exc:
            _log.warning("job %s: an input could not be had: %s", job_id, exc)
            result = _no_run(job_id, spec, exc.code, exc.detail)
        except asyncio.CancelledError:
            if job_id not in self._stops:
                raise
            # stop() cancelled the fetch: the job ends as it asked, below
        except (SandboxError, OciError) as exc:  # refused before it began
            _log.error("job %s could not start: %s", job_id, exc)
            result = _no_run(job_id, spec, exc.code, exc.detail)
        finally:
            flusher.cancel()
            logs.flush(final=True)
            if result is None:
                result = _no_run(job_id, spec, "", "stopped before it started")
                result.reason = "cancelled"
            self._containers.pop(job_id, None)
            try:
                await self.endings.finish(start.offer, units, result, keep)
            finally:
                self._end(job_id)

    async def _follow(
        self,
        job_id: str,
        spec: WorkloadSpec,
        units: list[str],
        fetched: dict[str, Path],
        logs: LogForwarder,
        *,
        keep: Path | None,
        auth: RegistryAuth | None = None,
        on_started: Callable[[str], None] | None = None,
        on_log: Callable[[str], None] | None = None,
    ) -> JobResult | None:
        """Run the job's container, carrying out what each of its events decides; its
        result, or None if the runner ended without one. A service's supervisor hears of
        its start (``on_started``, instead of the move to ``running``) and its output."""
        gpus = [device_facts(g) for g in self.node.scheduler.gpus_of(units)]
        result = None
        layers = self._pulls[job_id] = {}
        reported = -math.inf
        run = self.runner.run(job_id, spec, gpus, fetched, keep_outputs=keep, registry_auth=auth)
        async with aclosing(run) as events:
            async for event in events:
                if isinstance(event, Pulling):
                    layers[event.layer] = (event.done, event.total)
                    state, now = self._state(job_id), self.clock()
                    # Progress goes out at a bounded rate; the move to pulling at once.
                    if state != "pulling" or now - reported >= _PULL_REPORT_S:
                        self._carry_out(machine.pulling(job_id, state, layers))
                        reported = now
                elif isinstance(event, Pulled):
                    layers.clear()  # no pull under way any more
                    row = ImagePulled(event.reference, event.image_id, event.size)
                    self._carry_out(Decision(rows=(row,)))
                    await self.image_cache.trim(in_use=set(self._images_in_use.values()))
                elif isinstance(event, Created):
                    self._containers[job_id] = event.container_id
                    self._carry_out(Decision(rows=(ContainerOf(job_id, event.container_id),)))
                elif isinstance(event, Started):
                    if on_started is not None:
                        on_started(event.address)
                    else:
                        self._carry_out(machine.advance(job_id, self._state(job_id), "running"))
                elif isinstance(event, LogChunk):
                    logs.add(event.stream, event.data)
                    if on_log is not None:
                        on_log(event.data.decode(errors="replace"))
                elif isinstance(event, Finished):
                    result = event.result
        return result

    async def _serve(
        self,
        job_id: str,
        spec: WorkloadSpec,
        units: list[str],
        fetched: dict[str, Path],
        logs: LogForwarder,
        *,
        auth: RegistryAuth | None,
    ) -> JobResult | None:
        """Run a service until it ends (:mod:`agent.services.supervisor`): each attempt
        a run of its container; its states reported on change. Its last result, with the
        code of its end."""
        assert spec.service is not None  # a spec of kind service has one

        def attempt(
            on_started: Callable[[str], None], on_log: Callable[[str], None]
        ) -> Awaitable[JobResult | None]:
            return self._follow(
                job_id, spec, units, fetched, logs, keep=None, auth=auth,
                on_started=on_started, on_log=on_log,
            )  # fmt: skip

        def report(state: str, code: str, detail: str) -> None:
            current = self._state(job_id)
            self._carry_out(machine.advance(job_id, current, state, code, detail))  # type: ignore[arg-type]

        gpus = self.node.scheduler.gpus_of(units)
        hooks = Hooks(
            run=attempt,
            cancel=lambda: self.runner.cancel(job_id),
            report=report,
            stopped=lambda: self._stops.get(job_id),
            memory_full=lambda: memory_full(gpus, self.gpu_samples()),
        )
        supervisor = self.services[job_id] = ServiceSupervisor(
            spec.service, hooks, clock=self.clock
        )
        try:
            end = await supervisor.run()
        finally:
            del self.services[job_id]
        result = end.result or _no_run(job_id, spec, end.code, end.detail)
        result.error_code, result.detail = end.code, end.detail
        return result

    async def _fetch(
        self, job_id: str, spec: WorkloadSpec, held: AsyncExitStack
    ) -> dict[str, Path]:
        """The job's inputs given by URL, fetched or found in the cache, held in it until
        ``held`` closes (the job has ended)."""
        if self.inputs is None or all(item.url is None for item in spec.inputs):
            return {}
        progress = self._fetching[job_id] = self.inputs.progress(
            spec,
            every_s=_PULL_REPORT_S,
            clock=self.clock,
            report=lambda rows: self._carry_out(
                machine.fetching(job_id, self._state(job_id), rows)
            ),
        )
        try:
            progress.start()  # the move to fetching, at once
            stage = self.inputs.stage(spec, self.policy.allowed_input_hosts, progress.update)
            return await held.enter_async_context(stage)
        finally:
            del self._fetching[job_id]

    def _end(self, job_id: str) -> None:
        self.node.free(job_id)
        if self.delivery is not None:
            self.delivery.release(job_id)
        self._states.pop(job_id, None)
        self._images_in_use.pop(job_id, None)
        self._pulls.pop(job_id, None)
        del self.tasks[job_id]
        self.node.changed()

    async def _resume(self, upload: Upload) -> None:
        try:
            await self.endings.deliver(upload)
        finally:
            self._end(upload.job_id)

    def _state(self, job_id: str) -> str:
        state = self._states.get(job_id)
        if state is None:  # not decided by this manager: the ledger knows
            record = self.ledger.get(job_id)
            state = record.state if record is not None else "accepted"
        return state


def _cache_key(spec: WorkloadSpec) -> str | None:
    """The image cache's name for the spec's image: ``repository@sha256:...`` (None for a
    local image id or a tag, which the agent never pulls)."""
    ref = spec.image_ref
    if ref.repository is None or ref.digest is None:
        return None
    return f"{ref.repository}@{ref.digest}"


def _no_run(job_id: str, spec: WorkloadSpec, code: str, detail: str) -> JobResult:
    return JobResult(
        job_id=job_id,
        reason="error",
        exit_code=None,
        image_id=None,
        spec_digest=spec_digest(spec),
        log_sha256="",
        error_code=code or None,
        detail=detail,
    )
