"""What running a job produces: a stream of events ending in a result."""

from __future__ import annotations

from typing import Literal, TypeAlias

import msgspec

__all__ = [
    "Created",
    "Event",
    "ExitReason",
    "Exited",
    "Finished",
    "JobResult",
    "LogChunk",
    "OutputFile",
    "Pulled",
    "Pulling",
    "Started",
]

ExitReason = Literal["completed", "failed", "timeout", "oom_killed", "cancelled", "error"]


class OutputFile(msgspec.Struct, frozen=True, kw_only=True):
    """One collected output path; ``status`` says why there is no digest when there is none."""

    path: str
    status: Literal["ok", "missing", "not_a_file", "too_large"]
    size_bytes: int = 0
    sha256: str | None = None


class JobResult(msgspec.Struct, kw_only=True):
    """How a job ended, what it used, and digests of what it produced.

    Times are seconds since the epoch; ``cpu_seconds`` and ``peak_memory_bytes`` are None
    where the engine's cgroup setup could not measure them.
    """

    job_id: str
    reason: ExitReason
    exit_code: int | None
    image_id: str | None
    spec_digest: str
    started_at: float | None = None
    finished_at: float | None = None
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    outputs: list[OutputFile] = []
    log_sha256: str
    log_bytes: int = 0
    log_dropped_bytes: int = 0
    """Output seen and not kept (over the rate or the size cap)."""
    log_truncated: bool = False
    """The size cap was reached: what came after was read at the drain rate and dropped."""
    error_code: str | None = None
    detail: str = ""


class Pulling(msgspec.Struct, frozen=True, tag="pulling"):
    """The job's image is being pulled: one layer's bytes downloaded of its total."""

    layer: str
    done: int
    total: int


class Pulled(msgspec.Struct, frozen=True, tag="pulled"):
    """The job's image was pulled: ``reference`` (``repository@sha256:...``) is now the
    local image ``image_id`` of ``size`` bytes unpacked."""

    reference: str
    image_id: str
    size: int


class Created(msgspec.Struct, frozen=True, tag="created"):
    """The container exists (not yet started)."""

    container_id: str


class Started(msgspec.Struct, frozen=True, tag="started"):
    """The container's process runs; a service's is reached at ``address`` (its IP on
    its own network; empty for a batch job, which has none)."""

    at: float
    address: str = ""


class LogChunk(msgspec.Struct, frozen=True, tag="log"):
    """Some of the job's output, in order; bounded in size and rate by the runner."""

    stream: Literal["stdout", "stderr"]
    data: bytes


class Exited(msgspec.Struct, frozen=True, tag="exited"):
    """The container's process ended."""

    exit_code: int | None
    reason: ExitReason


class Finished(msgspec.Struct, frozen=True, tag="finished"):
    """The last event: everything is cleaned up and this is the result."""

    result: JobResult


Event: TypeAlias = Pulling | Pulled | Created | Started | LogChunk | Exited | Finished
