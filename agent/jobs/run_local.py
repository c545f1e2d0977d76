"""``gpu-agent run-local``: a spec file through policy and runner, on this machine.

What a provider uses to check their setup end to end: the same admission policy and the
same hardened runner a coordinator's job would go through, with its events on the terminal.
Unlike an offer, the spec may name its image by tag: a tag the engine has is the owner's
own image and runs as it is; any other is resolved at its registry (:func:`oci.resolve`,
for this machine's platform), printed, and pulled by that digest.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager, aclosing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

import msgspec

from agent.config.settings import CacheConfig
from agent.errors import InputError
from agent.inputs.stage import Inputs
from agent.jobs.gpus import device_facts, pick_gpus
from agent.jobs.images import engine_logins
from hal.backend import HalConfig
from hal.profile import take_profile
from oci import Credentials, OciError, RegistryClient, host_platform, resolve
from sandbox.docker_api import DockerClient
from sandbox.engine import Engine
from sandbox.errors import EngineError, PolicyViolation, SandboxError
from sandbox.events import (
    Created,
    Event,
    Exited,
    Finished,
    JobResult,
    LogChunk,
    Pulled,
    Pulling,
    Started,
)
from sandbox.gpu_mapping import DeviceFacts
from sandbox.policy import Policy, admit, load_policy_file
from sandbox.runner import Runner, RunnerConfig
from sandbox.spec import WorkloadSpec

__all__ = [
    "EXIT_FAILED",
    "EXIT_REFUSED",
    "Registries",
    "default_jobs_dir",
    "load_policy",
    "pin_tag",
    "run_local",
]

EXIT_FAILED = 1
EXIT_REFUSED = 3


@dataclass(frozen=True)
class Registries:
    """What resolving and pulling a tag may use: logins by registry host, a CA bundle."""

    logins: Mapping[str, Credentials] = field(default_factory=dict)
    ca_file: Path | None = None


def run_local(
    spec: WorkloadSpec,
    policy: Policy,
    *,
    hal_config: HalConfig,
    runner_config: RunnerConfig,
    docker_socket: str,
    as_json: bool,
    inputs: Inputs | None = None,
    registries: Registries | None = None,
) -> int:
    """Admit and run one spec; print its events and result; return the exit status.

    Inputs given by URL are fetched first into ``inputs`` (by default the user's cache,
    beside :func:`default_jobs_dir`).
    """
    profile = take_profile(hal_config)
    offered = frozenset(g.vendor for g in profile.gpus)
    try:
        admit(spec, policy, offered_vendors=offered)
    except PolicyViolation as refusal:
        _print_refusal(refusal, as_json)
        return EXIT_REFUSED
    chosen = pick_gpus(profile.gpus, spec.gpus)
    if chosen is None:
        message = f"no {spec.gpus.count} free GPU(s) on this machine meet the spec's constraints"
        _print_error("gpus_unavailable", message, as_json)
        return EXIT_REFUSED
    registries = registries or Registries()
    if registries.logins:
        auth = engine_logins(registries.logins)
        runner_config = msgspec.structs.replace(runner_config, registry_auth=auth)
    runner = Runner(DockerClient(docker_socket), runner_config)
    job_id = f"local-{uuid.uuid4().hex[:12]}"
    gpus = [device_facts(g) for g in chosen]
    try:
        staged: AbstractAsyncContextManager[dict[str, Path]] = nullcontext({})
        if any(item.url is not None for item in spec.inputs):
            if inputs is None:
                inputs = Inputs.open(default_jobs_dir().parent, CacheConfig())
            staged = inputs.stage(spec, policy.allowed_input_hosts)
        run = _run(
            runner, job_id, spec, gpus, as_json=as_json, staged=staged, registries=registries
        )
        result = asyncio.run(run)
    except (SandboxError, InputError, OciError) as exc:
        _print_error(exc.code, exc.detail, as_json)
        return EXIT_FAILED
    return 0 if result.reason == "completed" else EXIT_FAILED


async def _run(
    runner: Runner,
    job_id: str,
    spec: WorkloadSpec,
    gpus: list[DeviceFacts],
    *,
    as_json: bool,
    staged: AbstractAsyncContextManager[dict[str, Path]],
    registries: Registries,
) -> JobResult:
    await runner.prepare()
    spec = await pin_tag(runner.engine, spec, registries)
    async with staged as fetched:
        loop = asyncio.get_running_loop()
        # Ctrl-C stops the job the way a coordinator's cancel would: SIGTERM, grace, SIGKILL.
        loop.add_signal_handler(signal.SIGINT, runner.cancel, job_id)
        progress = PullProgress(sys.stderr) if not as_json and sys.stderr.isatty() else None
        try:
            async with aclosing(runner.run(job_id, spec, gpus, fetched)) as events:
                async for event in events:
                    if isinstance(event, Pulling):
                        if progress is not None:
                            progress.update(event)
                        continue
                    if progress is not None:
                        progress.done()
                    _print_event(event, as_json)
                    if isinstance(event, Finished):
                        return event.result
        finally:
            loop.remove_signal_handler(signal.SIGINT)
    raise AssertionError("the runner ended without a result")


async def pin_tag(engine: Engine, spec: WorkloadSpec, registries: Registries) -> WorkloadSpec:
    """``spec`` with its image pinned by digest if it names a tag the engine lacks (resolved
    at its registry and printed); as it is otherwise.

    Raises:
        OciError: the registry's code (``image_not_found``, ``registry_auth_failed``, ...).
        EngineError: the engine could not be asked.
    """
    ref = spec.image_ref
    if ref.is_pinned:
        return spec
    try:
        image = await engine.inspect_image(ref.canonical)
    except EngineError as exc:
        if exc.code != "image_not_found":
            raise
    else:
        print(f"[gpu-agent] {spec.image} is a local image: {image.id}", file=sys.stderr)
        return spec
    pinned = await asyncio.to_thread(_resolve, ref.canonical, registries)
    print(f"[gpu-agent] resolved {spec.image} to {pinned}", file=sys.stderr)
    return msgspec.structs.replace(spec, image=pinned)


def _resolve(reference: str, registries: Registries) -> str:
    with RegistryClient(credentials=registries.logins, ca_file=registries.ca_file) as client:
        return resolve(client, reference, host_platform()).pinned


class PullProgress:
    """One line on a terminal, redrawn as an image's layers download."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.layers: dict[str, tuple[int, int]] = {}
        self.shown = False

    def update(self, event: Pulling) -> None:
        """Take a layer's progress and redraw the line."""
        self.layers[event.layer] = (event.done, event.total)
        done = sum(d for d, _ in self.layers.values())
        total = sum(t for _, t in self.layers.values())
        self.out.write(f"\r[gpu-agent] pulling {line(done, total)}\x1b[K")
        self.out.flush()
        self.shown = True

    def done(self) -> None:
        """End the line, once, when the pull is over."""
        if self.shown:
            self.out.write("\n")
            self.out.flush()
            self.shown = False


def line(done: int, total: int) -> str:
    """``12.0 of 64.0 MiB (18%)``: how far a pull is."""
    mib = 1 << 20
    if total <= 0:
        return f"{done / mib:.1f} MiB"
    done = min(done, total)
    return f"{done / mib:.1f} of {total / mib:.1f} MiB ({100 * done // total}%)"


def _print_event(event: Event, as_json: bool) -> None:
    out = sys.stdout.buffer
    if as_json:
        out.write(msgspec.json.encode(event) + b"\n")
        out.flush()
        return
    if isinstance(event, LogChunk):
        stream: BinaryIO = sys.stderr.buffer if event.stream == "stderr" else out
        stream.write(event.data)
        stream.flush()
    elif isinstance(event, Pulled):
        print(f"[gpu-agent] pulled {event.reference} ({event.size} bytes)", file=sys.stderr)
    elif isinstance(event, Created):
        print(f"[gpu-agent] created container {event.container_id[:12]}", file=sys.stderr)
    elif isinstance(event, Started):
        print("[gpu-agent] started", file=sys.stderr)
    elif isinstance(event, Exited):
        print(f"[gpu-agent] exited {event.exit_code} ({event.reason})", file=sys.stderr)
    elif isinstance(event, Finished):
        out.write(msgspec.json.format(msgspec.json.encode(event.result)) + b"\n")
        out.flush()


def _print_refusal(refusal: PolicyViolation, as_json: bool) -> None:
    if as_json:
        body = {"error": refusal.code, "violations": refusal.violations}
        sys.stdout.buffer.write(msgspec.json.encode(body) + b"\n")
        return
    print(f"gpu-agent: refused [{refusal.code}]:", file=sys.stderr)
    for violation in refusal.violations:
        print(f"  - {violation.code}: {violation.message}", file=sys.stderr)


def _print_error(code: str, message: str, as_json: bool) -> None:
    if as_json:
        sys.stdout.buffer.write(msgspec.json.encode({"error": code, "detail": message}) + b"\n")
    else:
        print(f"gpu-agent: error [{code}]: {message}", file=sys.stderr)


def load_policy(path: Path | None) -> Policy:
    """The operator policy from a TOML file, or the permissive local default (any image,
    inputs from any host)."""
    if path is None:
        return Policy(allowed_images=["*"], allowed_input_hosts=["*"])
    return load_policy_file(path)


def default_jobs_dir() -> Path:
    """Where run-local keeps its jobs' directories while they run."""
    return Path.home() / ".cache" / "gpu-agent" / "jobs"
