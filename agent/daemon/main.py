"""``gpu-agent run``: the daemon. Profile, attest, stream telemetry, run signed jobs.

One asyncio loop: the sampler (HAL readings, in a thread) feeds telemetry batches into the
outbox and keeps each GPU's health; the job manager (agent/jobs/manager.py) takes the
coordinator's offers and cancels and runs jobs in the sandbox; the link delivers the
outbox and answers ``attest_request`` with a freshly signed profile. Whenever the node's
capacity changes (health, assignments, pause) a ``node_status`` goes out, never before
the GPUs were checked once.

SIGINT or SIGTERM: take no more offers, stop running jobs with their grace period (they
are reported ``interrupted``, with receipts), stop the sampler, write the last partial
batch, give the link a moment to deliver what is pending, and exit 0. Whatever is not
delivered stays in the outbox for the next start.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from agent.config.files import read_enrolment_token
from agent.config.settings import AgentConfig
from agent.control.server import ControlServer
from agent.daemon.control import DaemonControl
from agent.daemon.metrics import MetricsServer
from agent.daemon.systemd import Notifier, watchdog_interval
from agent.errors import OutboxError
from agent.jobs.manager import JobManager
from agent.jobs.scheduler import Scheduler, sample_health, xid_health
from agent.link.connection import Link, LinkConfig, Reply
from agent.link.identity import Identity, load_or_create
from agent.link.outbox import Outbox
from agent.owner.guard import OwnerGuard
from agent.owner.idle.monitor import IdleDetector
from agent.owner.policy import OwnerPolicy
from agent.owner.power import PowerLimiter
from agent.protocol import dsse
from agent.protocol.bodies import EnvelopeBody, NodeStatusBody, ProfileBody, TelemetryBody
from agent.protocol.limits import MAX_FRAME_BYTES, MAX_TELEMETRY_BATCH
from agent.protocol.messages import AttestRequest, JobCancel, JobOffer, Message
from hal import __version__
from hal.backend import HalConfig
from hal.host import host_sample
from hal.profile import take_profile
from hal.registry import Hal
from hal.types import GpuSample, HealthEvent, Profile, Sample
from sandbox.docker_api import DockerClient
from sandbox.policy import Policy
from sandbox.runner import Runner, RunnerConfig

__all__ = ["DaemonConfig", "daemon_config", "run_daemon"]

_log = logging.getLogger(__name__)
# {"v":1,"type":"telemetry","seq":<up to 19 digits>,"body":...} around a body.
_FRAME_OVERHEAD = 64


class DaemonConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What ``gpu-agent run`` needs.

    Attributes:
        state_dir: identity and outbox (with the job ledger) live here.
        link: the coordinator and its pinned keys (which also sign job offers).
        runner: how jobs run (jobs directory, OCI runtime, log caps).
        policy: what jobs may ask for.
        sample_interval_s: one HAL sample every so often.
        batch_samples: samples per telemetry message.
        flush_timeout_s: on stop, how long the link may take to deliver what is pending.
    """

    state_dir: Path
    link: LinkConfig
    runner: RunnerConfig
    policy: Policy
    docker_socket: str = "/var/run/docker.sock"
    max_concurrent: int = 0
    """Most jobs at once; 0: as many as the GPUs allow."""
    share_limit: int | None = None
    """Most GPU units busy at once; None: all."""
    sample_interval_s: float = 1.0
    batch_samples: int = 10
    flush_timeout_s: float = 5.0
    owner: OwnerPolicy = OwnerPolicy()
    """The owner's controls (agent/owner/policy.py); the control API may change them."""
    control_socket: Path | None = None
    """The local control API's socket; None: no control API."""
    control_mode: int = 0o660
    control_group: str | None = None
    metrics_listen: tuple[str, int] | None = None
    """Where ``/metrics`` is served (loopback); None: it is not."""


def daemon_config(config: AgentConfig) -> DaemonConfig:
    """What the daemon runs with, from the agent's configuration (``coordinator.url``
    must be set: ``load_config(..., require_coordinator=True)``).

    Raises:
        ConfigError: ``bad_config``: the enrolment token file changed for the worse
            since the configuration was checked.
    """
    coordinator, jobs = config.coordinator, config.jobs
    assert coordinator.url is not None
    token_file = coordinator.enrolment_token_file
    # Checked by load_config already; read once more here, where it is used, and kept
    # nowhere else (not in the status, not in the logs).
    token = read_enrolment_token(token_file) if token_file is not None else None
    group, mode = config.control.socket_group or None, config.control.socket_mode
    if group is not None and not _group_exists(group):
        # A system install has the group (packaging/gpu-agent.sysusers); root running the
        # agent by hand may not. Then only this user may use the socket, not the group.
        _log.warning("no group %r: the control socket is for this user only", group)
        group, mode = None, mode & 0o700
    return DaemonConfig(
        state_dir=config.paths.state_dir,
        link=LinkConfig(
            url=coordinator.url,
            pinned_keys=coordinator.pinned_keys,
            ca_file=coordinator.ca_file,
            enrolment_token=token,
        ),
        runner=RunnerConfig(
            jobs_dir=config.paths.jobs_dir,
            runtime=config.policy.runtime,
            user=jobs.user,
            log_max_bytes=jobs.log_max_bytes,
            log_rate_bytes_per_s=jobs.log_rate_bytes_per_s,
        ),
        policy=config.policy,
        docker_socket=jobs.docker_socket,
        max_concurrent=jobs.max_concurrent,
        sample_interval_s=config.telemetry.interval_s,
        batch_samples=config.telemetry.batch,
        owner=config.owner,
        control_socket=config.paths.control_socket,
        control_mode=mode,
        control_group=group,
        metrics_listen=(config.metrics.host, config.metrics.port)
        if config.metrics.enabled
        else None,
    )


class _Agent:
    def __init__(self, config: DaemonConfig, hal_config: HalConfig) -> None:
        self.config = config
        self.hal_config = hal_config
        self.identity: Identity = load_or_create(config.state_dir / "identity")
        self.outbox = Outbox.open(config.state_dir / "outbox.db")
        self.profile: Profile | None = None
        self.link = Link(config.link, self.identity, self.outbox, self.on_message, __version__)
        self.scheduler = Scheduler([])
        self.jobs: JobManager | None = None
        self._baseline_ecc: dict[str, int] = {}
        self.notifier = Notifier()
        self.latest_gpus: list[GpuSample] = []
        self.control: DaemonControl | None = None
        self.guard: OwnerGuard | None = None
        self.power = PowerLimiter([])
        self.control_server: ControlServer | None = None
        self.metrics_server: MetricsServer | None = None
        self._last_status: NodeStatusBody | None = None

    async def on_message(self, message: Message) -> Reply:
        """Handle a reliable coordinator message (called by the link, in order, once)."""
        if isinstance(message, AttestRequest):
            # The capacity goes with the profile, once the GPUs were checked.
            answer = [self.attest(message.body.nonce)]
            status = self.jobs.node_status() if self.jobs is not None else None
            if status is not None:
                answer.append(("node_status", msgspec.json.encode(status)))
            return Reply(answer, then=lambda: self._sent_status(status))
        assert self.jobs is not None  # the link starts after the job manager
        if isinstance(message, JobOffer):
            return await self.jobs.on_offer(message)
        if isinstance(message, JobCancel):
            return await self.jobs.on_cancel(message)
        _log.info("ignoring %s", type(message).__name__)
        return Reply()

    def report_node(self) -> None:
        """Queue a ``node_status`` if what the coordinator knows of this node changed, and
        tell the control API's subscribers."""
        self.publish()
        if self.jobs is None or (status := self.jobs.node_status()) is None:
            return
        if status == self._last_status:
            return
        try:
            self.outbox.append("node_status", msgspec.json.encode(status), time.time())
        except OutboxError as exc:
            _log.error("cannot store the node status (%s); trying at the next change", exc)
            return
        self._sent_status(status)
        self.link.wakeup.set()

    def _sent_status(self, status: NodeStatusBody | None) -> None:
        """``status`` is in the outbox: the next change is measured against it."""
        if status is None or self.jobs is None:
            return
        self._last_status = status
        self.notifier.status(_status_line(status, len(self.jobs.tasks)))

    def publish(self) -> None:
        """Send the current state to the control API's subscribers (it drops repeats)."""
        # Called at every tick: the status (a few SQLite reads) is built only when read.
        server = self.control_server
        if self.control is not None and server is not None and server.subscribed:
            server.publish(self.control.status())

    def check_health(self, gpus: list[GpuSample], events: Sequence[HealthEvent] = ()) -> None:
        """Each unit's health by the latest sample and the driver's events; a MIG instance
        without its own sample follows its GPU. The first call ends the initial check."""
        for event in events:
            verdict = xid_health(event.code) if event.kind == "xid" else None
            if verdict is None:
                continue
            _log.error("GPU %s: Xid %d; it takes no more jobs", event.gpu_id, event.code)
            for unit_id, unit in self.scheduler.units.items():
                # An event on a GPU split into MIG instances concerns each of them.
                if event.gpu_id in (unit_id, unit.gpu.parent_uuid):
                    self.scheduler.set_health(unit_id, *verdict)
        by_id = {g.id: g for g in gpus}
        for unit_id, unit in self.scheduler.units.items():
            sample = by_id.get(unit_id) or by_id.get(unit.gpu.parent_uuid or "")
            if sample is None:
                self.scheduler.set_health(unit_id, "unhealthy", "no_readings")
                continue
            errors = sample.ecc_uncorrected
            baseline = self._baseline_ecc.setdefault(
                unit_id, errors if isinstance(errors, int) else 0
            )
            if unit.health != "unhealthy":  # unhealthy stays so until the agent restarts
                self.scheduler.set_health(unit_id, *sample_health(sample, baseline))
        if self.jobs is not None:
            self.jobs.release("initialising")
        self.report_node()

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
                read_idle = self.guard.read_idle if self.guard is not None else _no_idle
                taken, events, idle = await asyncio.to_thread(_tick, hal, read_idle)
                self.latest_gpus = taken.gpus
                self.check_health(taken.gpus, events)
                if self.guard is not None:
                    self.guard.tick(taken.gpus, idle)
                    wanted = self.guard.power_limit_w()
                    # The HAL is asked (in its thread) only when the limit is to change.
                    if wanted != self.power.applied:
                        await asyncio.to_thread(self.power.apply, hal, wanted)
                        self.publish()
                batch.append(taken)
                if len(batch) >= min(self.config.batch_samples, MAX_TELEMETRY_BATCH):
                    batch = self.queue_telemetry(batch)
                next_tick += self.config.sample_interval_s
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, next_tick - loop.time()))
                except TimeoutError:
                    continue
        finally:
            # The owner gets the GPUs back at their own limits.
            await asyncio.to_thread(self.power.apply, hal, None)
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
        config = self.config
        self.scheduler = Scheduler(self.profile.gpus)
        self.power = PowerLimiter(self.profile.gpus)
        self.jobs = JobManager(
            identity=self.identity,
            outbox=self.outbox,
            runner=Runner(DockerClient(config.docker_socket), config.runner),
            policy=config.policy,
            scheduler=self.scheduler,
            trusted_keys=dict(config.link.pinned_keys),
            wake=self.link.wakeup.set,
            on_change=self.report_node,
            max_concurrent=config.max_concurrent,
            share_limit=config.share_limit,
        )
        self.guard = OwnerGuard(
            jobs=self.jobs,
            policy=config.owner,
            store=config.state_dir / "owner.json",
            idle_seconds=IdleDetector().idle_seconds,
        )
        await self.jobs.recover()
        await self._serve_locally()
        self.notifier.ready(f"profiled {len(self.profile.gpus)} GPU(s); connecting")
        watchdog = asyncio.create_task(self._watchdog())
        link_stop = asyncio.Event()
        linking = asyncio.create_task(self.link.run(link_stop))
        sampling = asyncio.create_task(self.sample(stop))
        stopped = asyncio.create_task(stop.wait())
        try:
            # A sampler that fails ends the daemon too, after the jobs are wound down.
            await asyncio.wait({stopped, sampling}, return_when=asyncio.FIRST_COMPLETED)
            stop.set()
            self.notifier.stopping(f"stopping {len(self.jobs.tasks)} job(s)")
            await self.jobs.shutdown()
            await sampling
            await self._flush()
        finally:
            sampling.cancel()
            stopped.cancel()
            watchdog.cancel()
            link_stop.set()
            await linking
            if self.control_server is not None:
                await self.control_server.close()
            if self.metrics_server is not None:
                await self.metrics_server.close()
            self.outbox.close()
        return 0

    async def _serve_locally(self) -> None:
        """Open the control API's socket and, if enabled, ``/metrics``.

        Raises:
            ControlError: the socket is in use (another daemon) or cannot be made.
            ConfigError: the metrics address cannot be bound.
        """
        config, jobs, guard = self.config, self.jobs, self.guard
        assert jobs is not None
        assert guard is not None
        self.control = DaemonControl(
            identity=self.identity,
            jobs=jobs,
            guard=guard,
            link=self.link,
            latest=lambda: self.latest_gpus,
            power=self.power.describe,
            clock=time.time,
        )
        if config.control_socket is not None:
            self.control_server = ControlServer(
                self.control,
                config.control_socket,
                mode=config.control_mode,
                group=config.control_group,
            )
            await self.control_server.start()
        if config.metrics_listen is not None:
            host, port = config.metrics_listen
            self.metrics_server = MetricsServer(self.control.metrics, host=host, port=port)
            await self.metrics_server.start()

    async def _watchdog(self) -> None:
        """Keep systemd's watchdog fed from the event loop: a loop that is stuck stops
        feeding it, and systemd restarts the service."""
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _flush(self) -> None:
        """Give the link a moment to deliver what the outbox still holds."""
        deadline = time.monotonic() + self.config.flush_timeout_s
        while self.outbox.depth() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.outbox.depth():
            _log.warning("%d messages stay in the outbox for the next start", self.outbox.depth())


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _status_line(status: NodeStatusBody, running: int) -> str:
    """One line for ``systemctl status``."""
    healthy = sum(1 for u in status.units if u.health == "healthy")
    taking = "taking jobs" if status.available else f"not taking jobs ({status.reason})"
    return f"{taking}; {healthy}/{len(status.units)} GPU(s) healthy; {running} job(s) running"


def _tick(
    hal: Hal, read_idle: Callable[[], float | None]
) -> tuple[Sample, list[HealthEvent], float | None]:
    """One sample of the host and the GPUs, the driver's events since the last, and the
    session's idle time (blocking reads, all in the sampler thread)."""
    sample = Sample(taken_at=time.time(), host=host_sample(), gpus=hal.sample())
    return sample, hal.events(), read_idle()


def _no_idle() -> float | None:
    return None


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
