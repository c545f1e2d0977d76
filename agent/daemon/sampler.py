"""The HAL's thread: a sample every interval, telemetry batches into the outbox.

Everything that talks to the hardware goes through here, off the event loop: the sample,
the driver's events, the session's idle time, and the owner's GPU power limit (set only
when it is to change, and given back at the end).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import msgspec

from agent.errors import OutboxError
from agent.link.outbox import Outbox
from agent.owner.power import PowerLimiter
from agent.protocol import batching
from agent.protocol.limits import MAX_TELEMETRY_BATCH
from hal.backend import HalConfig
from hal.host import host_sample
from hal.machine import Hal
from hal.types import GpuSample, HealthEvent, Sample

__all__ = ["Sampler", "Tick", "telemetry_bodies"]

_log = logging.getLogger(__name__)


class Tick(NamedTuple):
    """One sample of the host and the GPUs, the driver's events since the last, and the
    session's idle time (None: unknown)."""

    sample: Sample
    events: list[HealthEvent]
    idle: float | None


class Sampler:
    """Samples at ``interval_s``; queues a telemetry batch every ``batch`` samples."""

    def __init__(
        self,
        hal_config: HalConfig,
        outbox: Outbox,
        *,
        power: PowerLimiter,
        interval_s: float,
        batch: int,
        wake: Callable[[], None],
    ) -> None:
        self.hal_config = hal_config
        self.outbox = outbox
        self.power = power
        self.interval_s = interval_s
        self.batch = min(batch, MAX_TELEMETRY_BATCH)
        self.wake = wake
        self.latest_gpus: list[GpuSample] = []
        """The GPUs' latest readings (the control API shows them)."""

    async def run(
        self,
        stop: asyncio.Event,
        *,
        read_idle: Callable[[], float | None],
        on_tick: Callable[[Tick], None],
        power_target: Callable[[], float | None],
        on_power: Callable[[], None],
    ) -> None:
        """Sample until ``stop``: each tick to ``on_tick``, then the power limit that
        ``power_target`` wants (``on_power`` once it changed); the last batch at the end."""
        hal = Hal(self.hal_config)
        await asyncio.to_thread(hal.open)
        batch: list[Sample] = []
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        try:
            while not stop.is_set():
                tick = await asyncio.to_thread(_take, hal, read_idle)
                self.latest_gpus = tick.sample.gpus
                on_tick(tick)
                wanted = power_target()
                # The HAL is asked (in its thread) only when the limit is to change.
                if wanted != self.power.applied:
                    await asyncio.to_thread(self.power.apply, hal, wanted)
                    on_power()
                batch.append(tick.sample)
                if len(batch) >= self.batch:
                    batch = self.queue(batch)
                next_tick += self.interval_s
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, next_tick - loop.time()))
                except TimeoutError:
                    continue
        finally:
            # The owner gets the GPUs back at their own limits.
            await asyncio.to_thread(self.power.apply, hal, None)
            hal.close()
            if batch:
                self.queue(batch)

    def queue(self, samples: list[Sample]) -> list[Sample]:
        """Put a batch into the outbox (durable from here on) and wake the link; return
        what could not be stored (a full disk), to be tried again with the next batch."""
        try:
            self.outbox.append_many(
                [("telemetry", body) for body in telemetry_bodies(samples)], time.time()
            )
        except OutboxError as exc:
            _log.error("cannot store telemetry (%s); keeping %d samples", exc, len(samples))
            return samples[-MAX_TELEMETRY_BATCH:]
        self.wake()
        return []


def telemetry_bodies(samples: Sequence[Sample]) -> list[bytes]:
    """Encoded telemetry bodies for ``samples``, split so that every frame fits the limits."""
    return batching.telemetry_bodies(msgspec.to_builtins(samples))


def _take(hal: Hal, read_idle: Callable[[], float | None]) -> Tick:
    """One tick's blocking reads, all in the sampler thread."""
    sample = Sample(taken_at=time.time(), host=host_sample(), gpus=hal.sample())
    return Tick(sample, hal.events(), read_idle())
