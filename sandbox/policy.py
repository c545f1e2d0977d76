"""The operator's admission policy, and the pure check of a spec against it.

:func:`check` lists every rule a spec breaks, each as a :class:`~sandbox.errors.Violation`
with a stable code; :func:`admit` raises them all at once as a
:class:`~sandbox.errors.PolicyViolation`. Nothing here touches the engine: the policy is
decided before anything starts.

Image patterns in ``allowed_images`` are one of:

- a repository, normalised as Docker does: ``python`` is ``docker.io/library/python``; it
  allows every tag and digest of that repository;
- a glob over fully qualified repositories, e.g. ``ghcr.io/acme/*`` (``*`` also matches
  ``/``); write it with its registry, globs are not normalised; a bare local image id is
  matched as ``sha256:<hex>``, so ``*`` allows every image;
- a local image id, ``sha256:<64 hex>``, which allows a spec naming exactly that id.

Host patterns in ``allowed_input_hosts`` are globs over a URL's host name in lower case
(``*.example.org``, ``127.0.0.1``); the port is not part of it. They bound where the agent
fetches inputs from, the first URL and every redirect alike. ``allowed_upload_hosts`` are
the same kind of globs over where the agent may PUT a job's outputs (the upload targets an
offer names, which the agent checks: the spec does not carry them), plus
:data:`COORDINATOR_HOST`, which stands for the host of the coordinator the agent connects to.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec

from sandbox.errors import PolicyViolation, SpecError, Violation
from sandbox.files import read_regular
from sandbox.spec import ImageRef, WorkloadSpec, format_size
from sandbox.urls import host_allowed

__all__ = [
    "COORDINATOR_HOST",
    "MAX_POLICY_BYTES",
    "Policy",
    "admit",
    "check",
    "image_allowed",
    "load_policy_file",
]

MAX_POLICY_BYTES: Final = 1 << 20
"""The largest policy file read; a policy is a few hundred bytes."""

COORDINATOR_HOST: Final = "@coordinator"
"""In ``allowed_upload_hosts``: the host of the coordinator the agent connects to."""

_GLOB = re.compile(r"[*?\[]")
_GIB = 1 << 30

# A PEM public key, checked for its form here (the agent parses it: agent/jobs/images.py).
_PublicKeyPem = Annotated[
    str,
    msgspec.Meta(
        max_length=8192,
        pattern=r"^\s*-----BEGIN PUBLIC KEY-----\n[A-Za-z0-9+/=\n]+-----END PUBLIC KEY-----\s*$",
    ),
]

# Finite bounds on every limit: an infinite one can never be met by Docker nor shown.
_Bytes = Annotated[int, msgspec.Meta(ge=0, le=1 << 50)]
_DAY_S = 86400.0
_Show = Callable[[float], str]


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Operator-set limits on what a job may ask for; an empty ``allowed_images`` allows none."""

    allowed_images: list[str] = []
    max_cpus: Annotated[float, msgspec.Meta(gt=0, le=1024)] = 4.0
    max_memory_bytes: _Bytes = 8 * _GIB
    # The kernel's PID_MAX_LIMIT.
    max_pids: Annotated[int, msgspec.Meta(ge=0, le=1 << 22)] = 1024
    max_shm_bytes: _Bytes = _GIB
    max_scratch_bytes: _Bytes = 10 * _GIB
    max_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=30 * _DAY_S)] = _DAY_S
    max_grace_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 60.0
    max_gpus: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 8
    max_input_bytes: _Bytes = 512 * 1024
    """The inline inputs' total size."""
    allowed_input_hosts: list[str] = []
    """Where inputs given by URL may be fetched from (and redirected to); none if empty."""
    allowed_upload_hosts: list[str] = msgspec.field(default_factory=lambda: [COORDINATOR_HOST])
    """Where job outputs may be uploaded to; by default only the coordinator's own store."""
    max_url_input_bytes: _Bytes = 16 * _GIB
    """The largest input fetched by URL."""
    max_output_bytes: _Bytes = _GIB
    allow_egress: bool = False
    runtime: Literal["runc", "runsc"] = "runc"
    max_image_bytes: _Bytes | None = None
    """The largest image pulled, compressed (as its registry's manifest says); None: any."""
    max_image_unpacked_bytes: _Bytes | None = None
    """The largest image pulled, unpacked (as the engine counts it once pulled: a larger
    one is removed again); None: any."""
    image_signature_keys: Annotated[list[_PublicKeyPem], msgspec.Meta(max_length=16)] = []
    """PEM public keys (cosign's ECDSA P-256, or Ed25519): when any, an image pulled by
    digest must carry a cosign-style signature of that digest under one of them."""

    def __post_init__(self) -> None:
        # A pattern that can never match would refuse every job in silence: say so early.
        for pattern in self.allowed_images:
            if not _GLOB.search(pattern):
                ref = ImageRef.parse(pattern)  # ValueError names the pattern
                if ref.repository is not None and (ref.tag or ref.digest):
                    raise ValueError(f"{pattern!r}: a pattern names a repository, not a tag")


def image_allowed(image: ImageRef, patterns: list[str]) -> bool:
    """Whether an image reference matches one of the policy's image patterns."""
    for pattern in patterns:
        if _GLOB.search(pattern):
            # A bare image id has no repository: a glob then reads its id ("*" allows it).
            name = image.repository if image.repository is not None else str(image.digest)
            if fnmatch.fnmatchcase(name, pattern):
                return True
            continue
        allowed = ImageRef.parse(pattern)
        if allowed.repository is None:
            if image.repository is None and image.digest == allowed.digest:
                return True
        elif image.repository == allowed.repository:
            return True
    return False


def check(
    spec: WorkloadSpec, policy: Policy, *, offered_vendors: frozenset[str] = frozenset()
) -> list[Violation]:
    """Every rule of ``policy`` that ``spec`` breaks, in a fixed order; empty if none.

    ``offered_vendors`` are the vendors of the GPUs this node offers.
    """
    found: list[Violation] = []

    def over(code: str, field: str, asked: float, limit: float, show: _Show = str) -> None:
        if asked > limit:
            found.append(
                Violation(code, f"{field} {show(asked)} is over the limit of {show(limit)}")
            )

    if not image_allowed(spec.image_ref, policy.allowed_images):
        found.append(Violation("image_not_allowed", f"image {spec.image} is not allowed here"))
    gpus, res = spec.gpus, spec.resources
    over("too_many_gpus", "gpus.count", gpus.count, policy.max_gpus)
    if gpus.count and policy.runtime == "runsc":
        found.append(Violation("runtime_has_no_gpu", "jobs here run under runsc: it has no GPUs"))
    if gpus.count and not offered_vendors:
        found.append(Violation("gpu_vendor_not_offered", "this node offers no GPUs"))
    elif gpus.count and gpus.vendor is not None and gpus.vendor not in offered_vendors:
        offered = ", ".join(sorted(offered_vendors))
        message = f"{gpus.vendor} GPUs are not offered here, only {offered}"
        found.append(Violation("gpu_vendor_not_offered", message))
    over("cpus_over_limit", "resources.cpus", res.cpus, policy.max_cpus, _number)
    over("pids_over_limit", "resources.pids", res.pids, policy.max_pids)
    over("timeout_over_limit", "timeout_s", spec.timeout_s, policy.max_timeout_s, _seconds)
    over("grace_over_limit", "grace_s", spec.grace_s, policy.max_grace_s, _seconds)
    if spec.network == "egress" and not policy.allow_egress:
        found.append(Violation("egress_not_allowed", "this node allows no network egress"))
    inputs = sum(item.inline_bytes for item in spec.inputs)
    for item in spec.inputs:
        if item.url is None:
            continue
        if not host_allowed(item.url, policy.allowed_input_hosts):
            message = f"input {item.path!r}: the host of {item.url} is not allowed here"
            found.append(Violation("input_host_not_allowed", message))
        field = f"input {item.path!r}"
        over("input_over_limit", field, item.size_bytes or 0, policy.max_url_input_bytes, _size)
    for code, field, asked, limit in (
        ("memory_over_limit", "resources.memory_bytes", res.memory_bytes, policy.max_memory_bytes),
        ("shm_over_limit", "resources.shm_bytes", res.shm_bytes, policy.max_shm_bytes),
        (
            "scratch_over_limit",
            "resources.scratch_bytes",
            res.scratch_bytes,
            policy.max_scratch_bytes,
        ),
        ("inputs_over_limit", "the inputs' total size", inputs, policy.max_input_bytes),
        ("outputs_over_limit", "output_max_bytes", spec.output_max_bytes, policy.max_output_bytes),
    ):
        over(code, field, asked, limit, _size)
    return found


def _number(value: float) -> str:
    return f"{value:g}"


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _size(value: float) -> str:
    return format_size(int(value))


def admit(
    spec: WorkloadSpec, policy: Policy, *, offered_vendors: frozenset[str] = frozenset()
) -> None:
    """Raise PolicyViolation listing every rule ``spec`` breaks; return if it breaks none."""
    violations = check(spec, policy, offered_vendors=offered_vendors)
    if violations:
        raise PolicyViolation(violations)


def load_policy_file(path: Path) -> Policy:
    """The policy in the TOML file ``path``: a regular file of at most
    :data:`MAX_POLICY_BYTES` (``--policy /dev/zero`` is refused, not read forever).

    Raises:
        SpecError: ``bad_policy``, naming the file and the fault.
    """
    try:
        data = read_regular(path, MAX_POLICY_BYTES)
    except OSError as exc:
        raise SpecError("bad_policy", "", f"cannot read {path}: {exc.strerror}") from None
    try:
        return msgspec.toml.decode(data, type=Policy)
    except msgspec.ValidationError as exc:
        raise SpecError("bad_policy", "", f"{path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise SpecError("bad_policy", "", f"{path} is not TOML: {exc}") from None
    except RecursionError:
        # The TOML parser recurses once per level of [[[...]]]: 1 MiB holds plenty.
        raise SpecError("bad_policy", "", f"{path} is not TOML: nested too deeply") from None
