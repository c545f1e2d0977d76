"""``gpu-agent run``: the daemon. Profile, attest, stream telemetry, run signed jobs.

One asyncio loop, wired here and nothing else: the sampler (agent/daemon/sampler.py, the
HAL in a thread) feeds telemetry batches into the outbox and each tick to the health check
and the owner's guard; the job manager (agent/jobs/manager.py) takes the coordinator's
offers and cancels and runs jobs in the sandbox; the link delivers the outbox, and the
daemon answers ``attest_request`` with a freshly signed profile. Whenever the node's
capacity changes (health, assignments, pause: agent/jobs/node.py) a ``node_status`` goes
out (agent/daemon/node_status.py), never before the GPUs were checked once.

SIGINT or SIGTERM: take no more offers, stop running jobs with their grace period (they
are reported ``interrupted``, with receipts), stop the sampler, write the last partial
batch, give the link a moment to deliver what is pending, and exit 0. Whatever is not
delivered stays in the outbox for the next start.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from agent.config.files import read_enrolment_token, read_registry_logins
from agent.config.settings import AgentConfig, CacheConfig
from agent.control.server import ControlServer
from agent.daemon.control import DaemonControl
from agent.daemon.health import HealthCheck
from agent.daemon.metrics import MetricsServer
from agent.daemon.node_status import NodeReporter
from agent.daemon.sampler import Sampler, Tick
from agent.daemon.systemd import Notifier, watchdog_interval
from agent.inputs.stage import Inputs
from agent.jobs.delivery import Delivery
from agent.jobs.images import ImageGate, engine_logins, load_keys
from agent.jobs.manager import ImageBudget, JobManager
from agent.jobs.node import NodeState
from agent.jobs.scheduler import Scheduler
from agent.link.connection import Link, LinkConfig, client_ssl
from agent.link.identity import Identity, load_or_create
from agent.link.outbox import Outbox
from agent.owner.guard import OwnerGuard
from agent.owner.idle.monitor import IdleDetector
from agent.owner.policy import OwnerPolicy
from agent.owner.power import PowerLimiter
from agent.protocol import dsse
from agent.protocol.bodies import EnvelopeBody, ProfileBody
from agent.protocol.memory import reuse_freed_memory
from agent.protocol.messages import (
    AttestRequest,
    ImagePrefetch,
    JobCancel,
    JobOffer,
    Message,
    ServiceRenew,
)
from agent.protocol.signals import stop_on_signals
from agent.services.tunnel import ServiceTunnel, tunnel_url
from hal import __version__
from hal.backend import HalConfig
from hal.profile import take_profile
from hal.types import Profile
from oci import Credentials
from sandbox.docker_api import DockerClient
from sandbox.policy import Policy
from sandbox.runner import Runner, RunnerConfig

__all__ = ["DaemonConfig", "daemon_config", "run_daemon"]

_log = logging.getLogger(__name__)


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
    registry_logins: dict[str, Credentials] = {}
    """Registry logins, for the node's own checks of an image before its pull."""
    registry_ca_file: Path | None = None
    image_budget: ImageBudget = ImageBudget()
    cache: CacheConfig = CacheConfig()
    """The fetched inputs' cache (under ``state_dir``) and fetch limits."""
    upload_spool_max_bytes: int = 4 << 30
    """Most bytes of outputs waiting for upload in ``state_dir/spool`` at once."""


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
    logins_file = jobs.registry_logins_file
    logins = read_registry_logins(logins_file) if logins_file is not None else {}
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
            registry_auth=engine_logins(logins),
            pull_idle_timeout_s=jobs.pull_timeout_s,
            max_image_unpacked_bytes=config.policy.max_image_unpacked_bytes,
        ),
        policy=config.policy,
        docker_socket=jobs.docker_socket,
        max_concurrent=jobs.max_concurrent,
        upload_spool_max_bytes=jobs.upload_spool_max_bytes,
        sample_interval_s=config.telemetry.interval_s,
        batch_samples=config.telemetry.batch,
        owner=config.owner,
        control_socket=config.paths.control_socket,
        control_mode=mode,
        control_group=group,
        registry_logins=logins,
        registry_ca_file=jobs.registry_ca_file,
        image_budget=ImageBudget(
            max_bytes=jobs.image_cache_max_bytes, min_free_bytes=jobs.image_cache_min_free_bytes
        ),
        cache=config.cache,
        metrics_listen=(config.metrics.host, config.metrics.port)
        if config.metrics.enabled
        else None,
    )


class _Daemon:
    """The daemon's parts, each made once the hardware profile is known."""

    def __init__(
        self,
        config: DaemonConfig,
        hal_config: HalConfig,
        *,
        identity: Identity,
        outbox: Outbox,
        profile: Profile,
    ) -> None:
        self.config = config
        self.identity = identity
        self.outbox = outbox
        self.profile = profile
        self.notifier = Notifier()
        self.node = NodeState(Scheduler(profile.gpus), share_limit=config.share_limit)
        self.link = Link(
            config.link,
            identity,
            outbox,
            self.on_message,
            __version__,
            profile_digest=dsse.profile_digest(msgspec.to_builtins(profile)),
        )
        wake = self.link.wakeup.set
        self.jobs = JobManager(
            identity=identity,
            outbox=outbox,
            runner=Runner(DockerClient(config.docker_socket), config.runner),
            policy=config.policy,
            node=self.node,
            trusted_keys=dict(config.link.pinned_keys),
            wake=wake,
            max_concurrent=config.max_concurrent,
            images=ImageGate(
                keys=load_keys(config.policy.image_signature_keys),
                max_bytes=config.policy.max_image_bytes,
                logins=config.registry_logins,
                ca_file=config.registry_ca_file,
            ),
            image_budget=config.image_budget,
            inputs=Inputs.open(config.state_dir, config.cache),
            delivery=Delivery(
                config.state_dir / "spool",
                max_bytes=config.upload_spool_max_bytes,
                ca_file=config.link.ca_file,
            ),
            coordinator_host=urlsplit(config.link.url).hostname,
        )
        link_config = config.link
        self.tunnel = ServiceTunnel(
            url=tunnel_url(link_config.url),
            identity=identity,
            pinned_keys=link_config.pinned_keys,
            resolve=self._service_address,
            ssl_context=client_ssl(link_config),
            agent_version=__version__,
        )
        self.guard = OwnerGuard(
            jobs=self.jobs,
            node=self.node,
            policy=config.owner,
            store=config.state_dir / "owner.json",
            idle_seconds=IdleDetector().idle_seconds,
        )
        self.health = HealthCheck(self.node)
        power = PowerLimiter(profile.gpus)
        self.sampler = Sampler(
            hal_config,
            outbox,
            power=power,
            interval_s=config.sample_interval_s,
            batch=config.batch_samples,
            wake=wake,
        )
        self.jobs.gpu_samples = lambda: self.sampler.latest_gpus
        self.jobs.in_flight = self.tunnel.streams_to
        self.control = DaemonControl(
            identity=identity,
            jobs=self.jobs,
            node=self.node,
            guard=self.guard,
            link=self.link,
            latest=lambda: self.sampler.latest_gpus,
            power=power.describe,
            clock=time.time,
        )
        self.control_server = (
            ControlServer(
                self.control,
                config.control_socket,
                mode=config.control_mode,
                group=config.control_group,
            )
            if config.control_socket is not None
            else None
        )
        self.metrics_server = (
            MetricsServer(
                self.control.metrics, host=config.metrics_listen[0], port=config.metrics_listen[1]
            )
            if config.metrics_listen is not None
            else None
        )
        self.reporter = NodeReporter(
            self.node,
            outbox,
            notifier=self.notifier,
            wake=wake,
            running=lambda: len(self.jobs.tasks),
            publish=self.publish,
        )
        self.node.on_change = self.reporter.report

    async def on_message(self, message: Message) -> None:
        """Handle a reliable coordinator message (called by the link, in order, once)."""
        if isinstance(message, AttestRequest):
            # The capacity goes with the profile, once the GPUs were checked.
            answer = [self.attest(message.body.nonce)]
            status = self.node.status()
            if status is not None:
                answer.append(("node_status", msgspec.json.encode(status)))
            self.outbox.append_many(answer, time.time(), coordinator_seq=message.seq)
            self.link.wakeup.set()
            self.reporter.sent(status)
        elif isinstance(message, JobOffer):
            await self.jobs.on_offer(message)
        elif isinstance(message, JobCancel):
            await self.jobs.on_cancel(message)
        elif isinstance(message, ImagePrefetch):
            await self.jobs.on_prefetch(message)
        elif isinstance(message, ServiceRenew):
            self.jobs.on_renew(message)
        else:
            _log.info("ignoring %s", type(message).__name__)

    def attest(self, nonce: str) -> tuple[str, bytes]:
        """The hardware profile, signed, with the coordinator's nonce in it."""
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

    def publish(self) -> None:
        """Send the current state to the control API's subscribers (it drops repeats)."""
        # Called at every tick: the status (a few SQLite reads) is built only when read.
        server = self.control_server
        if server is not None and server.subscribed:
            server.publish(self.control.status())

    def on_tick(self, tick: Tick) -> None:
        """One sample: the units' health, then the owner's guards."""
        self.health.check(tick.sample.gpus, tick.events)
        self.guard.tick(tick.sample.gpus, tick.idle)

    async def run(self, stop: asyncio.Event) -> int:
        await self.jobs.recover()
        if self.control_server is not None:
            await self.control_server.start()
        if self.metrics_server is not None:
            await self.metrics_server.start()
        self.notifier.ready(f"profiled {len(self.profile.gpus)} GPU(s); connecting")
        watchdog = asyncio.create_task(self._watchdog())
        link_stop = asyncio.Event()
        linking = asyncio.create_task(self.link.run(link_stop))
        tunnelling = asyncio.create_task(self._tunnel_once_linked())
        sampling = asyncio.create_task(
            self.sampler.run(
                stop,
                read_idle=self.guard.read_idle,
                on_tick=self.on_tick,
                power_target=self.guard.power_limit_w,
                on_power=self.publish,
            )
        )
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
            tunnelling.cancel()
            await self.tunnel.stop()
            await linking
            if self.control_server is not None:
                await self.control_server.close()
            if self.metrics_server is not None:
                await self.metrics_server.close()
        return 0

    async def _tunnel_once_linked(self) -> None:
        """Open the services' data connection (the coordinator's requests for them come in
        on it) once the control link is up: a new node is admitted there, not here."""
        await self.link.connected.wait()
        self.tunnel.start()

    async def _service_address(self, target: str) -> tuple[str, int] | None:
        """Where the tunnel takes a stream for ``target`` (a service's job id): its server,
        once it runs and unless it is draining."""
        service = self.jobs.services.get(target)
        if service is None or not service.address or service.draining:
            return None
        return service.address, service.service.port

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


async def _main(config: DaemonConfig, hal_config: HalConfig) -> int:
    """Refuse an unsafe key before anything else; profile; run until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    restore = stop_on_signals(stop)
    try:
        identity = load_or_create(config.state_dir / "identity")
        outbox = Outbox.open(config.state_dir / "outbox.db")
        try:
            profile = await asyncio.to_thread(take_profile, hal_config)
            daemon = _Daemon(config, hal_config, identity=identity, outbox=outbox, profile=profile)
            return await daemon.run(stop)
        finally:
            outbox.close()
    finally:
        restore()


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def run_daemon(config: DaemonConfig, hal_config: HalConfig) -> int:
    """Run the agent until SIGINT or SIGTERM; return the exit status."""
    reuse_freed_memory()
    return asyncio.run(_main(config, hal_config))
