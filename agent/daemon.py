"""``gpu-agent run``: profile, attest, and stream telemetry to the coordinator until stopped.

One asyncio loop: the sampler (HAL readings, in a thread) feeds telemetry batches into the
outbox; the link delivers the outbox and answers ``attest_request`` with a freshly signed
profile. SIGINT or SIGTERM stops the sampler, writes the last partial batch, gives the link
a moment to deliver what is pending, and exits 0. Whatever is not delivered stays in the
outbox for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import msgspec

from agent.errors import OutboxError
from agent.identity import Identity, load_or_create
from agent.link import Link, LinkConfig
from agent.outbox import Outbox
from agent.protocol import dsse
from agent.protocol.bodies import EnvelopeBody, ProfileBody, TelemetryBody
from agent.protocol.limits import MAX_FRAME_BYTES, MAX_TELEMETRY_BATCH
from agent.protocol.messages import AttestRequest, Message
from hal import __version__
from hal.backend import HalConfig
from hal.host import host_sample
from hal.profile import take_profile
from hal.registry import Hal
from hal.types import Profile, Sample

__all__ = ["DaemonConfig", "run_daemon"]

_log = logging.getLogger(__name__)
# {"v":1,"type":"telemetry","seq":<up to 19 digits>,"body":...} around a body.
_FRAME_OVERHEAD = 64


class DaemonConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What ``gpu-agent run`` needs.

    Attributes:
        state_dir: identity and outbox live here.
        link: the coordinator and its pinned keys.
        sample_interval_s: one HAL sample every so often.
        batch_samples: samples per telemetry message.
        flush_timeout_s: on stop, how long the link may take to deliver what is pending.
    """

    state_dir: Path
    link: LinkConfig
    sample_interval_s: float = 1.0
    batch_samples: int = 10
    flush_timeout_s: float = 5.0


class _Agent:
    def __init__(self, config: DaemonConfig, hal_config: HalConfig) -> None:
        self.config = config
        self.hal_config = hal_config
        self.identity: Identity = load_or_create(config.state_dir / "identity")
        self.outbox = Outbox.open(config.state_dir / "outbox.db")
        self.profile: Profile | None = None
        self.link = Link(config.link, self.identity, self.outbox, self.on_message, __version__)

    async def on_message(self, message: Message) -> list[tuple[str, bytes]]:
        """Handle a reliable coordinator message (called by the link, in order, once);
        return what to queue in answer."""
        if isinstance(message, AttestRequest):
            return [self.attest(message.body.nonce)]
        _log.info("ignoring %s: jobs are not served yet", type(message).__name__)
        return []

    def attest(self, nonce: str) -> tuple[str, bytes]:
        """The hardware profile, signed, with the coordinator's nonce in it."""
        assert self.profile is not None
        identity = self.identity
        envelope = dsse.attest_profile(
            msgspec.to_builtins(self.profile),
            nonce,
            identity.node_id,
            identity.private_key,
            identity.key_id,
        )
        body = ProfileBody(attestation=msgspec.convert(msgspec.to_builtins(envelope), EnvelopeBody))
        return "profile", msgspec.json.encode(body)

    async def sample(self, stop: asyncio.Event) -> None:
        """Sample at the configured interval; queue a telemetry batch every few samples."""
        hal = Hal(self.hal_config)
        await asyncio.to_thread(hal.open)
        batch: list[Sample] = []
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        try:
            while not stop.is_set():
                taken = await asyncio.to_thread(
                    lambda: Sample(taken_at=time.time(), host=host_sample(), gpus=hal.sample())
                )
                batch.append(taken)
                if len(batch) >= min(self.config.batch_samples, MAX_TELEMETRY_BATCH):
                    batch = self.queue_telemetry(batch)
                next_tick += self.config.sample_interval_s
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, next_tick - loop.time()))
                except TimeoutError:
                    continue
        finally:
            hal.close()
            if batch:
                self.queue_telemetry(batch)

    def queue_telemetry(self, samples: list[Sample]) -> list[Sample]:
        """Put a batch into the outbox (durable from here on) and wake the link; return
        what could not be stored (a full disk), to be tried again with the next batch."""
        try:
            self.outbox.append_many(
                [("telemetry", body) for body in _telemetry_bodies(samples)], time.time()
            )
        except OutboxError as exc:
            _log.error("cannot store telemetry (%s); keeping %d samples", exc, len(samples))
            return samples[-MAX_TELEMETRY_BATCH:]
        self.link.wakeup.set()
        return []

    async def run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        self.profile = await asyncio.to_thread(take_profile, self.hal_config)
        link_stop = asyncio.Event()
        linking = asyncio.create_task(self.link.run(link_stop))
        try:
            await self.sample(stop)
            await self._flush()
        finally:
            link_stop.set()
            await linking
            self.outbox.close()
        return 0

    async def _flush(self) -> None:
        """Give the link a moment to deliver what the outbox still holds."""
        deadline = time.monotonic() + self.config.flush_timeout_s
        while self.outbox.depth() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.outbox.depth():
            _log.warning("%d messages stay in the outbox for the next start", self.outbox.depth())


def _telemetry_bodies(samples: list[Sample]) -> list[bytes]:
    """Encoded telemetry bodies for ``samples``, split so that every frame fits the limit."""
    body = msgspec.json.encode(TelemetryBody(samples=msgspec.to_builtins(samples)))
    if len(body) + _FRAME_OVERHEAD <= MAX_FRAME_BYTES or len(samples) == 1:
        return [body]
    half = len(samples) // 2
    return _telemetry_bodies(samples[:half]) + _telemetry_bodies(samples[half:])


def run_daemon(config: DaemonConfig, hal_config: HalConfig) -> int:
    """Run the agent until SIGINT or SIGTERM; return the exit status."""
    return asyncio.run(_Agent(config, hal_config).run())
