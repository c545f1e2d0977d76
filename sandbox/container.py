"""The Docker ``create`` body of a job: the sandbox defaults of ARCHITECTURE.md, in one place.

Pure: from a spec and what the runner prepared to the :class:`ContainerConfig` the engine
receives. Nothing
in a spec can widen it; the spec has no field for privileges, mounts or host namespaces.
"""

from __future__ import annotations

import math
import posixpath

from sandbox.engine_types import ContainerConfig, HostConfig, LogConfig, Mount, Ulimit
from sandbox.errors import RunError, SpecError
from sandbox.gpu_mapping import ContainerGpus
from sandbox.jobdir import JobMounts
from sandbox.spec import MIN_CPUS, WorkloadSpec

__all__ = [
    "INPUT_DIR",
    "LABEL_JOB",
    "LABEL_MANAGED",
    "LABEL_RUNNER",
    "OUTPUT_DIR",
    "RUNSC_MEMORY_HEADROOM",
    "RUNSC_PIDS_HEADROOM",
    "create_body",
    "volume_paths",
]

LABEL_MANAGED = "io.gpu-agent.managed"
LABEL_JOB = "io.gpu-agent.job"
LABEL_RUNNER = "io.gpu-agent.runner"
INPUT_DIR = "/input"
OUTPUT_DIR = "/output"
_TMP_BYTES = 64 << 20
# The kernel's own file systems: a volume over them is no data directory, and a tmpfs
# there would hide what the runtime mounts.
_KERNEL_DIRS = frozenset(("proc", "sys", "dev"))
_NOFILE = 4096
# gVisor's pids cgroup also counts the sandbox's own threads (its Go runtime, the gofer):
# without room for them a modest limit kills the sandbox before the job starts.
RUNSC_PIDS_HEADROOM = 128
# Its memory, too, is charged to the job's cgroup: the job keeps what it asked for.
RUNSC_MEMORY_HEADROOM = 64 << 20
# No log driver: the runner attaches and reads the output itself, at a rate it bounds.
# Docker's json-file driver would keep a copy on host disk and cost the engine a JSON
# entry per line, outside the job's CPU cap (`yes ''` at 0.2 CPUs: 1.7 host cores).
_LOG_CONFIG = LogConfig(type="none", config={})


def volume_paths(declared: list[str]) -> list[str]:
    """The image's ``VOLUME`` paths as Docker matches them against mounts (Go's
    ``filepath.Clean``); RunError ``bad_image_volume`` for one no tmpfs can cover.

    The image is hostile too: declared as ``/data/`` or ``//data``, a volume is made at
    ``/data``, which a tmpfs keyed ``/data/`` does not cover.
    """
    cleaned = []
    for path in declared:
        clean = "/" + posixpath.normpath(path).lstrip("/")
        top = clean.split("/")[1]
        if not path.startswith("/") or clean == "/" or top in _KERNEL_DIRS or "\0" in path:
            raise RunError("bad_image_volume", f"the image declares a volume at {path!r}")
        cleaned.append(clean)
    return sorted(set(cleaned))


def create_body(
    *,
    job_id: str,
    spec: WorkloadSpec,
    image_id: str,
    gpus: ContainerGpus,
    mounts: JobMounts,
    user: str,
    runtime: str,
    cgroup_parent: str | None,
    runner: str,
    image_volumes: list[str],
    network: str | None = None,
) -> ContainerConfig:
    """The body of ``POST /containers/create`` for one job.

    ``image_volumes`` are the paths the image declares as ``VOLUME``: each that is not
    bind-mounted gets a tmpfs of the scratch size, or Docker would make an anonymous
    volume of unbounded host disk; see :func:`volume_paths`. ``network``: a service's
    own network (:mod:`sandbox.service_net`), instead of none or the engine's bridge.
    """
    resources = spec.resources
    # A spec built in code is not validated: 0 nanocpus would be no CPU limit at all.
    if not (math.isfinite(resources.cpus) and resources.cpus >= MIN_CPUS):
        raise SpecError("bad_value", "resources.cpus", f"{resources.cpus} is under {MIN_CPUS}")
    nano_cpus = round(resources.cpus * 1e9)
    uid, _, gid = user.partition(":")
    memory = resources.memory_bytes + (RUNSC_MEMORY_HEADROOM if runtime == "runsc" else 0)
    binds = []
    # Only what is bind-mounted is left out of the image's volumes' tmpfs: /input or
    # /output with nothing of the job's there would be anonymous volumes on host disk.
    bound = [INPUT_DIR] if mounts.input_dir is not None else []
    bound += [OUTPUT_DIR] if mounts.output_dir is not None else []
    if mounts.input_dir is not None:
        binds.append(f"{mounts.input_dir}:{INPUT_DIR}:ro")
    if mounts.output_dir is not None:
        binds.append(f"{mounts.output_dir}:{OUTPUT_DIR}:rw")
    # A file may grow no larger than what the job may write anywhere: scratch or outputs.
    fsize = max(resources.scratch_bytes, spec.output_max_bytes)
    tmpfs = {
        # Owned by the job's user: when /scratch is also the working directory, Docker
        # makes the mount point root's 0755 whatever mode= says. exec: the job may run
        # what it builds in its own workspace; /tmp stays noexec.
        "/scratch": f"rw,exec,nosuid,nodev,size={resources.scratch_bytes},"
        f"mode=0700,uid={uid},gid={gid}",
        "/tmp": f"rw,noexec,nosuid,nodev,size={_TMP_BYTES},mode=1777",
        **{
            path: f"rw,noexec,nosuid,nodev,size={resources.scratch_bytes},"
            f"mode=0700,uid={uid},gid={gid}"
            for path in volume_paths(image_volumes)
            if path not in ("/scratch", "/tmp", *bound)
        },
    }
    host_config = HostConfig(
        privileged=False,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        readonly_rootfs=True,
        init=True,
        ipc_mode="private",
        network_mode=network or ("bridge" if spec.network == "egress" else "none"),
        memory=memory,
        memory_swap=memory,  # equal to Memory: no swap
        nano_cpus=nano_cpus,
        pids_limit=resources.pids + (RUNSC_PIDS_HEADROOM if runtime == "runsc" else 0),
        shm_size=resources.shm_bytes,
        tmpfs=tmpfs,
        ulimits=[
            Ulimit("fsize", fsize, fsize),
            Ulimit("nofile", _NOFILE, _NOFILE),
            Ulimit("core", 0, 0),
        ],
        binds=binds,
        devices=gpus.devices,
        device_requests=gpus.device_requests,
        group_add=gpus.group_add,
        log_config=_LOG_CONFIG,
        runtime=runtime,
        auto_remove=False,  # the runner removes it, after reading how it ended
        # Each over its empty file in the read-only /input: the job cannot change the cache.
        mounts=[
            Mount(type="bind", source=str(host), target=target, read_only=True)
            for target, host in mounts.input_files
        ],
        cgroup_parent=cgroup_parent,
    )
    return ContainerConfig(
        image=image_id,
        env=[f"{key}={value}" for key, value in {**spec.env, **gpus.env}.items()],
        working_dir=spec.workdir,
        user=user,
        labels={LABEL_MANAGED: "1", LABEL_JOB: job_id, LABEL_RUNNER: runner},
        network_disabled=network is None and spec.network != "egress",
        stop_signal="SIGTERM",
        stop_timeout=int(spec.grace_s),
        attach_stdout=False,
        attach_stderr=False,
        tty=False,
        host_config=host_config,
        # Kubernetes' meaning: command replaces the image's entrypoint, args its command.
        entrypoint=spec.command or None,
        cmd=spec.args if spec.args or spec.command else None,
    )
