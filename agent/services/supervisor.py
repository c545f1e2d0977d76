"""A service's life on the node: its server run, probed, restarted, stopped at its lease.

The job manager runs a spec of kind ``service`` through :class:`ServiceSupervisor`
instead of once: each *attempt* is one run of the container (the manager's own run of
it, :attr:`Hooks.run`, which reports the container's events as a batch job's). Once an
attempt's container started, its server is probed over HTTP at the address the runner
gave (:mod:`agent.services.health` decides what each answer means), and its states are
reported on change only: ``starting``, ``ready``, ``unhealthy``, ``restarting``. An
attempt ends when the container exits, when a check says restart, when the lease runs
out, or when the manager stops it; then the server is restarted after a backoff that
doubles up to its ceiling, until the restart limit. What ended the service is the code of
its final state (``stopped``): ``lease_expired``, ``restart_limit``, or the manager's
reason (``cancelled``, ``preempted``, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import httpx

from agent.services.health import Health
from sandbox.events import JobResult
from sandbox.service_spec import HttpCheck, ServiceSpec

__all__ = ["Hooks", "ServiceEnd", "ServiceSupervisor", "http_probe"]

_log = logging.getLogger(__name__)
# What a server's last words say when the GPU ran out of memory (CUDA, ROCm, llama.cpp).
_GPU_OOM: Final = re.compile(
    r"CUDA[_ ]ERROR[_ ]OUT[_ ]OF[_ ]MEMORY|CUDA error: out of memory|hipErrorOutOfMemory"
    r"|cudaMalloc failed: out of memory|failed to allocate .* buffer",
    re.IGNORECASE,
)
_LOG_TAIL: Final = 8192
_DRAIN_POLL_S: Final = 0.1

Probe = Callable[[str, int, HttpCheck], Awaitable[str]]
"""Send ``check`` to the server at (address, port): "" if it passed, else why not."""


async def http_probe(address: str, port: int, check: HttpCheck) -> str:
    """:data:`Probe` over HTTP: a 2xx status line and headers within the check's timeout
    pass. The whole check is bounded, not each read (a server trickling a byte a second
    would hold a per-read timeout open for ever), and no body is read (a server that sends
    gigabytes costs nothing)."""
    host = f"[{address}]" if ":" in address else address
    try:
        async with asyncio.timeout(check.timeout_s):
            async with httpx.AsyncClient(timeout=check.timeout_s, trust_env=False) as client:
                request = client.build_request("GET", f"http://{host}:{port}{check.path}")
                answer = await client.send(request, stream=True)
                await answer.aclose()
    except TimeoutError:
        return f"no answer within {check.timeout_s:g} s"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    return "" if 200 <= answer.status_code < 300 else f"{check.path} answered {answer.status_code}"


@dataclass(frozen=True)
class Hooks:
    """What the supervisor asks of the job manager.

    Attributes:
        run: one attempt: run the container, calling ``on_started(address)`` once it runs
            and ``on_log(text)`` with its output; its result (None if it had none).
        cancel: stop the attempt under way (SIGTERM, grace, SIGKILL).
        report: a state change, with its code and detail.
        stopped: why the manager is stopping the service, or None.
        memory_full: whether its GPUs' memory is (nearly) all used now, as NVML and the
            other backends read it; looked at with each probe.
    """

    run: Callable[[Callable[[str], None], Callable[[str], None]], Awaitable[JobResult | None]]
    cancel: Callable[[], object]
    report: Callable[[str, str, str], None]
    stopped: Callable[[], str | None]
    memory_full: Callable[[], bool] = lambda: False


@dataclass(frozen=True)
class ServiceEnd:
    """How a service ended: its last attempt's result, and the code and detail of its
    final state (``started``: whether any attempt's container ever ran)."""

    result: JobResult | None
    code: str
    detail: str
    started: bool


class ServiceSupervisor:
    """Runs one service until its lease ends, it is stopped, or it restarts too often."""

    def __init__(
        self,
        service: ServiceSpec,
        hooks: Hooks,
        *,
        grace_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        probe: Probe = http_probe,
    ) -> None:
        self.service = service
        self.hooks = hooks
        self.grace_s = grace_s
        self.clock = clock
        self.probe = probe
        self.lease_until = clock() + service.lease_s
        self.address = ""
        """Where the server of the attempt under way answers ("" between attempts)."""
        self.phase = ""
        self.draining = False
        """Set once the node drains it: no new requests, whatever its checks say."""
        self._ending: tuple[str, str] | None = None
        self._memory_full_at: float | None = None
        self._wake = asyncio.Event()

    @property
    def ready(self) -> bool:
        """Whether requests may go to the server now."""
        return self.phase == "ready" and bool(self.address) and not self.draining

    def renew(self, until: float) -> None:
        """Extend the lease to ``until`` (on :attr:`clock`'s scale); never shortens it."""
        if until > self.lease_until:
            self.lease_until = until
            self._wake.set()

    async def drain(self, in_flight: Callable[[], int]) -> None:
        """Take no new requests, let those in flight finish (for its spec's grace period
        at most), then stop the server: the service ends ``drained``."""
        if self.phase == "ready":
            self._set("unhealthy", "draining", "the node is draining")
        self.draining = True
        deadline = self.clock() + self.grace_s
        while in_flight() > 0 and self.clock() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        if self._ending is None:
            self._ending = ("drained", f"the node drained it ({in_flight()} request(s) cut)")
        self.hooks.cancel()
        self._wake.set()

    def wake(self) -> None:
        """The manager decided to stop the service: end a backoff now."""
        self._wake.set()

    async def run(self) -> ServiceEnd:
        """Attempts until the service ends; how it ended."""
        restarts, started = 0, False
        lease = asyncio.create_task(self._lease())
        try:
            while True:
                result, ran, why = await self._attempt()
                started = started or ran
                if (end := self._ended(result, started)) is not None:
                    return end
                if not ran:  # it never ran: the engine's or the image's fault, not the server's
                    code = result.error_code if result and result.error_code else "start_failed"
                    return ServiceEnd(result, code, result.detail if result else "", started)
                code, detail = why or _exit_reason(result)
                if restarts >= self.service.restart.limit:
                    limit = self.service.restart.limit
                    detail = f"{code} after {limit} restart(s): {detail}"
                    return ServiceEnd(result, "restart_limit", detail, started)
                restarts += 1
                self._set("restarting", code, detail)
                await self._backoff(restarts)
                if (end := self._ended(result, started)) is not None:
                    return end
        finally:
            lease.cancel()

    def _ended(self, result: JobResult | None, started: bool) -> ServiceEnd | None:
        """The service's end, if the manager stopped it or its lease ran out."""
        if (reason := self.hooks.stopped()) is not None:
            return ServiceEnd(result, reason, "stopped by the node", started)
        if self._ending is not None:
            return ServiceEnd(result, *self._ending, started)
        return None

    async def _attempt(self) -> tuple[JobResult | None, bool, tuple[str, str] | None]:
        """One run of the container: its result, whether it started, and why the
        supervisor ended it (None: it ended by itself, or was stopped)."""
        tail: list[str] = []
        self._memory_full_at = None
        started: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_started(address: str) -> None:
            # Reported here, not by the watch: a server that dies at once was started.
            if not started.done():
                started.set_result(address)
                self.address = address
                self._set("starting", "", "")

        def on_log(text: str) -> None:
            tail.append(text)
            while sum(map(len, tail)) > _LOG_TAIL and len(tail) > 1:
                tail.pop(0)

        why: list[tuple[str, str]] = []
        watch = asyncio.create_task(self._watch(started, why))
        try:
            result = await self.hooks.run(on_started, on_log)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            self.address, self.phase = "", ""
        if not why and _GPU_OOM.search("".join(tail)):
            why.append(("gpu_oom", "the server ran out of GPU memory (its log says so)"))
        elif not why and self._memory_full_at is not None:
            # Full at the last look before it died: freed by now, but that is why.
            why.append(("gpu_oom", "its GPUs' memory was full when it ended (as read)"))
        return result, started.done(), why[0] if why else None

    async def _watch(self, started: asyncio.Future[str], why: list[tuple[str, str]]) -> None:
        """Probe the server once it runs; say why and stop the attempt if it must restart."""
        address = await started
        health = Health(self.service, self.clock())
        while True:
            check = health.check
            failure = await self.probe(address, self.service.port, check)
            if self.hooks.stopped() is not None or self._ending is not None:
                return  # being stopped: a server going down says nothing of its health
            self._memory_full_at = self.clock() if self.hooks.memory_full() else None
            verdict = health.observe(not failure, self.clock(), failure)
            if verdict.phase is not None and not self.draining:
                self._set(verdict.phase, "", verdict.detail)
            if verdict.restart:
                why.append((verdict.restart, verdict.detail))
                self.hooks.cancel()
                return
            await asyncio.sleep(check.interval_s)

    async def _lease(self) -> None:
        """End the service when its lease runs out (renewals push that back)."""
        while (left := self.lease_until - self.clock()) > 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=left)
        self._ending = ("lease_expired", f"its lease of {self.service.lease_s:g} s ran out")
        self.hooks.cancel()
        self._wake.set()

    async def _backoff(self, restarts: int) -> None:
        """Wait before the next attempt; less if the service ends meanwhile."""
        policy = self.service.restart
        delay = min(policy.backoff_s * 2 ** (restarts - 1), policy.max_backoff_s)
        deadline = self.clock() + delay
        while (left := deadline - self.clock()) > 0:
            if self.hooks.stopped() is not None or self._ending is not None:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=left)

    def _set(self, phase: str, code: str, detail: str) -> None:
        if phase != self.phase:
            self.phase = phase
            self.hooks.report(phase, code, detail)


def _exit_reason(result: JobResult | None) -> tuple[str, str]:
    """Why an attempt whose container ended by itself ended."""
    if result is None:
        return "exited", "the runner gave no result"
    if result.reason == "oom_killed":
        return "oom_killed", "the kernel killed it for memory"
    if result.error_code:
        return result.error_code, result.detail
    return "exited", f"the server exited {result.exit_code}"
