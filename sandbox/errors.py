"""Errors of the sandbox.

Every error carries a stable ``code`` that can travel to a coordinator, and is grouped by
how a caller reacts to it::

    SandboxError                   base; never raised itself
    +-- SpecError                  the workload spec is unusable (refuse the job, say where)
    |     codes: bad_spec, spec_too_large, unknown_field, missing_field, forbidden_field,
    |            bad_value, path_too_long, path_too_deep
    +-- PolicyViolation            the spec asks for more than this node allows (refuse the
    |     code: policy_violation   job, list every rule broken in ``violations``)
    +-- EngineError                the Docker engine failed us (report; retry later)
    |     codes: engine_unreachable, engine_error, image_not_found, not_found, engine_too_old
    |     (``status``: the engine's HTTP status, when it answered; sandbox.engine maps them)
    +-- PullError                  the job's image could not be pulled (report it as an error)
    |     codes: image_not_found, registry_auth_failed, registry_unreachable, image_not_pinned,
    |            digest_mismatch, pull_timeout, disk_full, pull_failed
    +-- RunError                   the runner could not run this job (report it as an error)
          codes: start_failed, gpu_unmappable, bad_job_id, job_running, runtime_missing,
                 bad_image_volume, no_free_uid, input_missing
"""

from __future__ import annotations

import msgspec

__all__ = [
    "EngineError",
    "PolicyViolation",
    "PullError",
    "RunError",
    "SandboxError",
    "SpecError",
    "Violation",
]


class SandboxError(Exception):
    """Base of every sandbox error; ``code`` is stable, ``detail`` is for humans."""

    code: str = "sandbox_error"

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class SpecError(SandboxError):
    """A workload spec cannot be decoded or is invalid; ``field`` is its dotted path."""

    def __init__(self, code: str, field: str, problem: str) -> None:
        super().__init__(code, f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


class Violation(msgspec.Struct, frozen=True):
    """One admission rule a spec breaks: a stable ``code`` and a message for humans."""

    code: str
    message: str


class PolicyViolation(SandboxError):
    """A spec breaks the operator's admission policy; ``violations`` has every rule broken."""

    def __init__(self, violations: list[Violation]) -> None:
        super().__init__(
            "policy_violation", "; ".join(f"{v.code}: {v.message}" for v in violations)
        )
        self.violations = violations


class EngineError(SandboxError):
    """The Docker engine is unreachable, too old, or answered with an error.

    ``status`` is the HTTP status of an engine's refusal, None when there was no answer
    (or no usable one).
    """

    def __init__(self, code: str, detail: str = "", *, status: int | None = None) -> None:
        super().__init__(code, detail)
        self.status = status


class RunError(SandboxError):
    """The runner could not run a job (as opposed to the job running and failing)."""


class PullError(SandboxError):
    """The job's image could not be pulled from its registry."""
