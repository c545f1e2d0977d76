"""A service's health machine and its supervisor, driven by scripted attempts and probes
(the engine's part is tests/integration/test_service_jobs.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from support import factories

from agent.jobs.gpus import memory_full
from agent.services.health import Health, Verdict
from agent.services.supervisor import Hooks, ServiceSupervisor
from hal.types import GpuSample
from sandbox.events import JobResult
from sandbox.service_spec import HttpCheck, ServiceSpec


def _service(**changes: Any) -> ServiceSpec:
    fields: dict[str, Any] = {
        "port": 8080,
        "models": ["tiny"],
        "readiness": {"interval_s": 0.1},
        "liveness": {"interval_s": 0.1, "failures": 2},
        "start_allowance_s": 1,
        "restart": {"limit": 2, "backoff_s": 0, "max_backoff_s": 0},
        "lease_s": 3600,
    }
    return msgspec.convert({**fields, **changes}, ServiceSpec)


def test_a_server_is_ready_at_its_first_pass_and_restarted_past_its_allowance() -> None:
    health = Health(_service(), started_at=100.0)
    assert health.observe(False, 100.5, "refused") == Verdict()
    assert health.observe(True, 100.6) == Verdict(phase="ready")
    late = Health(_service(), started_at=100.0)
    verdict = late.observe(False, 101.0, "refused")
    assert (verdict.restart, "refused" in verdict.detail) == ("not_ready", True)


def test_a_ready_server_is_unhealthy_at_a_failure_ready_again_and_restarted_at_the_limit() -> None:
    health = Health(_service(), started_at=0.0)
    health.observe(True, 0.1)
    assert health.check.path == "/health"
    assert health.observe(False, 1.0, "timeout") == Verdict(phase="unhealthy", detail="timeout")
    assert health.observe(True, 1.1) == Verdict(phase="ready")
    assert health.observe(False, 1.2) == Verdict(phase="unhealthy", detail="")
    assert health.observe(False, 1.3).restart == "liveness_failed"


def _result(reason: str = "completed", exit_code: int | None = 0, **more: Any) -> JobResult:
    return JobResult(
        job_id="s1",
        reason=reason,  # type: ignore[arg-type]
        exit_code=exit_code,
        image_id=None,
        spec_digest="",
        log_sha256="",
        **more,
    )


class _Node:
    """Scripted attempts: each ``script`` entry runs one, given the hooks' callbacks."""

    def __init__(self, *script: Callable[[Callable[[str], None], Callable[[str], None]], Any]):
        self.script = list(script)
        self.reports: list[tuple[str, str]] = []
        self.stop: str | None = None
        self.cancelled = asyncio.Event()
        self.probes: list[str] = []

    async def run(
        self, on_started: Callable[[str], None], on_log: Callable[[str], None]
    ) -> JobResult | None:
        self.cancelled.clear()
        return await self.script.pop(0)(on_started, on_log)  # type: ignore[no-any-return]

    def hooks(self) -> Hooks:
        return Hooks(
            run=self.run,
            cancel=self.cancelled.set,
            report=lambda state, code, _: self.reports.append((state, code)),
            stopped=lambda: self.stop,
        )

    async def probe(self, address: str, port: int, check: HttpCheck) -> str:
        self.probes.append(f"{address}:{port}{check.path}")
        return ""

    async def serve_until_cancelled(
        self, on_started: Callable[[str], None], _: Callable[[str], None]
    ) -> JobResult:
        on_started("10.0.0.2")
        await self.cancelled.wait()
        return _result("cancelled", 143)


async def _crash(on_started: Callable[[str], None], on_log: Callable[[str], None]) -> JobResult:
    on_started("10.0.0.2")
    on_log("loading...\nCUDA error: out of memory\n")
    return _result("failed", 1)


async def test_a_server_that_keeps_dying_is_restarted_to_its_limit_then_stopped() -> None:
    node = _Node(_crash, _crash, _crash)
    end = await ServiceSupervisor(_service(), node.hooks(), probe=node.probe).run()
    assert (end.code, end.started) == ("restart_limit", True)
    assert "gpu_oom" in end.detail
    assert [state for state, _ in node.reports] == ["starting", "restarting"] * 2 + ["starting"]
    assert ("restarting", "gpu_oom") in node.reports


async def test_a_ready_server_runs_until_its_lease_runs_out() -> None:
    node = _Node()
    node.script.append(node.serve_until_cancelled)
    clock = [0.0]
    supervisor = ServiceSupervisor(
        _service(lease_s=10), node.hooks(), probe=node.probe, clock=lambda: clock[0]
    )
    running = asyncio.create_task(supervisor.run())
    while not supervisor.ready:
        await asyncio.sleep(0.01)
    assert node.probes[0] == "10.0.0.2:8080/health"
    supervisor.renew(5.0)  # never shortens it
    clock[0] = 20.0
    supervisor.renew(15.0)  # too late to matter, and wakes the lease's watch
    end = await running
    assert (end.code, [s for s, _ in node.reports]) == ("lease_expired", ["starting", "ready"])


async def test_a_service_stopped_in_its_backoff_ends_at_once_with_the_reason() -> None:
    node = _Node(_crash)
    policy = {"limit": 3, "backoff_s": 3600, "max_backoff_s": 3600}
    supervisor = ServiceSupervisor(_service(restart=policy), node.hooks(), probe=node.probe)
    running = asyncio.create_task(supervisor.run())
    while ("restarting", "gpu_oom") not in node.reports:
        await asyncio.sleep(0.01)
    node.stop = "cancelled"
    supervisor.wake()
    end = await asyncio.wait_for(running, timeout=30)
    assert end.code == "cancelled"


async def test_a_server_that_never_started_ends_with_the_runners_code() -> None:
    async def refused(_: Callable[[str], None], __: Callable[[str], None]) -> JobResult:
        return _result("error", None, error_code="image_not_found", detail="gone")

    node = _Node(refused)
    end = await ServiceSupervisor(_service(), node.hooks(), probe=node.probe).run()
    assert (end.code, end.detail, end.started, node.reports) == (
        "image_not_found",
        "gone",
        False,
        [],
    )


@pytest.mark.parametrize("field", ["port", "models"])
def test_a_service_table_without_its_required_fields_does_not_decode(field: str) -> None:
    raw = {"port": 1, "models": ["m"]}
    del raw[field]
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(raw, ServiceSpec)


def test_a_gpu_is_full_from_95_percent_of_its_memory_and_an_unread_one_never() -> None:
    gib = 1 << 30
    gpus = [factories.gpu(id="a", vram_total_bytes=24 * gib), factories.gpu(id="b")]
    assert not memory_full(gpus, [GpuSample(id="a", memory_used_bytes=22 * gib)])
    assert memory_full(gpus, [GpuSample(id="a", memory_used_bytes=23 * gib)])
    # b's total is not known: however much it uses, it is not called full.
    assert not memory_full(gpus, [GpuSample(id="b", memory_used_bytes=99 * gib)])
    assert not memory_full(gpus, [])


async def test_a_server_that_dies_with_its_gpu_memory_full_is_restarted_for_gpu_oom() -> None:
    full = [False]
    seen_full = asyncio.Event()

    def gpu_full() -> bool:
        if full[0]:
            seen_full.set()
        return full[0]

    async def fills_then_dies(
        on_started: Callable[[str], None], _: Callable[[str], None]
    ) -> JobResult:
        on_started("10.0.0.2")
        await seen_full.wait()  # it dies once its GPU memory was read full
        return _result("failed", 139)

    async def quiet(_: Callable[[str], None], __: Callable[[str], None]) -> JobResult:
        return _result("error", None, error_code="stopped", detail="")

    node = _Node(fills_then_dies, quiet)
    made = node.hooks()
    supervisor = ServiceSupervisor(
        _service(restart={"limit": 1, "backoff_s": 0, "max_backoff_s": 0}),
        Hooks(
            run=made.run,
            cancel=made.cancel,
            report=made.report,
            stopped=made.stopped,
            memory_full=gpu_full,
        ),
        probe=node.probe,
    )
    running = asyncio.create_task(supervisor.run())
    while "ready" not in [state for state, _ in node.reports]:
        await asyncio.sleep(0.01)
    full[0] = True
    await asyncio.wait_for(running, timeout=30)
    assert ("restarting", "gpu_oom") in node.reports


async def test_a_server_going_down_because_it_is_stopped_is_not_called_unhealthy() -> None:
    node = _Node()
    node.script.append(node.serve_until_cancelled)
    probed_after_stop = asyncio.Event()

    async def probe(address: str, port: int, check: HttpCheck) -> str:
        if node.stop is None:
            return ""
        probed_after_stop.set()
        return "ConnectError: refused"  # the server is on its way down

    supervisor = ServiceSupervisor(_service(), node.hooks(), probe=probe)
    running = asyncio.create_task(supervisor.run())
    while not supervisor.ready:
        await asyncio.sleep(0.01)
    node.stop = "cancelled"  # as the manager's stop() does, before the runner acts on it
    await probed_after_stop.wait()
    node.cancelled.set()
    end = await asyncio.wait_for(running, timeout=30)
    assert (end.code, node.reports) == ("cancelled", [("starting", ""), ("ready", "")])
