"""Offers out and receipts in, sans I/O: a signed offer made, a verified receipt judged.

An offer is :class:`agent.protocol.jobs.Offer` signed with the coordinator key; what the
coordinator stores and shows of it is :class:`SignedOffer`. A receipt arrives already
verified (signed by the node's key, about the node); :func:`receipt_problems` then says
what else does not hold: which job it names, which offer it ran, and whether it extends
the node's hash chain of receipts.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from typing import Any, Final, Literal

import msgspec

from agent.protocol.errors import DecodeError, LimitExceeded
from agent.protocol.jobs import FINAL_STATES, Offer, Receipt, offer_digest, sign_offer
from agent.protocol.limits import MAX_SEQ
from agent.protocol.messages import EnvelopeBody, JobOfferBody, encode_frame, wrap
from agent.protocol.uploads import UploadTarget, check_uploads
from coordinator.errors import JobError
from coordinator.keys import CoordinatorKey
from sandbox.errors import SpecError
from sandbox.spec import ImageRef, WorkloadSpec, load_spec

__all__ = [
    "CHAIN_BROKEN",
    "DEFAULT_TTL_S",
    "MAX_TTL_S",
    "RECEIPT_PROBLEMS",
    "UPLOAD_GRACE_S",
    "Draft",
    "SignedOffer",
    "check_spec",
    "draft_offer",
    "make_offer",
    "new_job_id",
    "receipt_problems",
    "repin",
    "sign_draft",
]

#: How long an offer may wait for its node by default, in seconds.
DEFAULT_TTL_S: Final = 3600.0
#: The longest an offer may be valid: an offer is not a standing order.
MAX_TTL_S: Final = 30 * 86400.0
#: How long past a job's latest possible end its artifact tokens stay valid, in seconds.
UPLOAD_GRACE_S: Final = 86400.0
#: The receipt's ``prev_receipt`` is not the digest of the node's previous receipt.
CHAIN_BROKEN: Final = "chain_broken"
#: Every code :func:`receipt_problems` returns, in the order it returns them.
RECEIPT_PROBLEMS: Final = (
    "bad_receipt",  # not a Receipt (agent.protocol.jobs): nothing else could be checked
    "job_mismatch",  # names another job than the job_result it came in
    "node_mismatch",  # names another node than the one that signed it
    "unknown_job",  # no job of this id was offered to this node
    "offer_mismatch",  # offer_sha256 is not the digest of the offer this coordinator signed
    "not_final",  # its state is not a final one with a receipt
    CHAIN_BROKEN,
)


class SignedOffer(msgspec.Struct, frozen=True, kw_only=True):
    """An offer, its digest, and the ``job_offer`` body that carries it."""

    offer: Offer
    sha256: str
    """:func:`agent.protocol.jobs.offer_digest`: what the node's receipt must name."""
    body: JobOfferBody


def new_job_id() -> str:
    """A fresh job id, ``job-`` and 16 hex digits."""
    return "job-" + secrets.token_hex(8)


def check_spec(data: bytes, fmt: Literal["toml", "json"]) -> None:
    """Validate an encoded spec exactly as a node does before it runs one.

    Raises:
        JobError: with the code of :class:`sandbox.errors.SpecError` (``bad_spec``,
            ``spec_too_large``, ``unknown_field``, ``missing_field``, ``forbidden_field``,
            ``bad_value``), the field named in its detail.
    """
    try:
        load_spec(data, fmt)
    except SpecError as exc:
        raise JobError(exc.code, exc.detail) from None


class Draft(msgspec.Struct, frozen=True, kw_only=True):
    """An offer checked as the node will check it, not signed yet (:func:`draft_offer`)."""

    offer: Offer
    spec: WorkloadSpec
    """The offer's spec as the node loads it."""
    ttl_s: float


def draft_offer(
    *,
    job_id: str,
    node_id: str,
    spec: Any,
    now: float,
    ttl_s: float = DEFAULT_TTL_S,
    uploads: Any = None,
    registry_logins: Any = None,
) -> Draft:
    """The offer of ``spec`` to ``node_id``, checked: everything :func:`make_offer` refuses
    but the frame's size, which only the signed offer has.

    Raises:
        JobError: as :func:`make_offer`, but ``spec_too_large`` only of the spec itself.
    """
    if not isinstance(spec, dict):
        raise JobError("bad_spec", "a spec is a JSON object (a TOML table)")
    if not isinstance(ttl_s, int | float) or not (math.isfinite(ttl_s) and 0 < ttl_s <= MAX_TTL_S):
        raise JobError("bad_ttl", f"ttl_s must be in (0, {MAX_TTL_S:.0f}] seconds")
    fields = {
        "job_id": job_id,
        "node_id": node_id,
        "spec": spec,
        "issued_at": now,
        "expires_at": now + ttl_s,
        "uploads": uploads or {},
        "registry_logins": registry_logins or {},
    }
    try:
        # Round trip through JSON: the spec is signed, stored and sent exactly as the node
        # will decode it, and anything that is not JSON is refused here.
        offer = msgspec.json.decode(msgspec.json.encode(fields), type=Offer)
    except (msgspec.ValidationError, TypeError) as exc:
        where = str(exc)
        if "$.job_id" in where:
            raise JobError("bad_job_id", f"{job_id!r}: {where}") from None
        if "$.uploads" in where:
            raise JobError("bad_upload_target", where) from None
        if "$.registry_logins" in where:
            # msgspec's message names the path, never the value: no password in an error.
            raise JobError("bad_registry_login", where) from None
        raise JobError("bad_spec", where) from None
    # The node decodes the offer's spec from JSON and loads it so (agent.jobs): the same here.
    loaded = _load(offer.spec)
    registry = loaded.image_ref.repository
    for host in offer.registry_logins:
        if registry is None or host != registry.split("/", 1)[0]:
            raise JobError("bad_registry_login", f"a login for {host}; the image is {loaded.image}")
    try:
        check_uploads(offer.uploads, loaded.outputs)
    except DecodeError as exc:
        raise JobError(exc.code, exc.detail) from None
    return Draft(offer=offer, spec=loaded, ttl_s=float(ttl_s))


def repin(draft: Draft, image: object, now: float) -> Draft:
    """``draft`` with its spec's image replaced by ``image`` (the tag pinned to a digest),
    issued ``now``. Nothing else of the spec changed (its repository neither, so a login
    for its registry still is one), so only the image is checked again, as the node checks
    one.

    Raises:
        JobError: ``bad_value`` (no image reference the node reads, e.g. over 255
            characters once pinned).
    """
    if not isinstance(image, str):
        raise JobError("bad_value", f"image: {image!r} is not a reference")
    try:
        ImageRef.parse(image)
    except ValueError as exc:
        raise JobError("bad_value", f"image: {exc}") from None
    offer = msgspec.structs.replace(
        draft.offer,
        spec={**draft.offer.spec, "image": image},
        issued_at=now,
        expires_at=now + draft.ttl_s,
    )
    return msgspec.structs.replace(
        draft, offer=offer, spec=msgspec.structs.replace(draft.spec, image=image)
    )


def sign_draft(
    key: CoordinatorKey,
    draft: Draft,
    default_target: Callable[[str, str, float], UploadTarget] | None = None,
) -> SignedOffer:
    """``draft`` signed, its outputs without a target given ``default_target(job_id, path,
    expires_at)``, checked to fit in one frame.

    Raises:
        JobError: ``spec_too_large`` (the offer would not fit in a frame).
    """
    offer, job_id = draft.offer, draft.offer.job_id
    if default_target is not None:
        # A token must outlive the job: taken at the offer's last moment, run to its
        # timeout, then its uploads retried for a while.
        until = offer.expires_at + draft.spec.timeout_s + UPLOAD_GRACE_S
        filled = {
            path: offer.uploads.get(path) or default_target(job_id, path, until)
            for path in draft.spec.outputs
        }
        offer = msgspec.structs.replace(offer, uploads=filled)
    envelope = sign_offer(offer, key.private_key, key.key_id)
    body = JobOfferBody(
        job_id=job_id, offer=msgspec.convert(msgspec.to_builtins(envelope), EnvelopeBody)
    )
    try:
        encode_frame(wrap(body, MAX_SEQ))  # the longest seq: the frame fits whatever seq it gets
    except LimitExceeded as exc:
        raise JobError("spec_too_large", f"the offer would not fit in a frame: {exc}") from None
    return SignedOffer(offer=offer, sha256=offer_digest(offer), body=body)


def make_offer(
    key: CoordinatorKey,
    *,
    job_id: str,
    node_id: str,
    spec: Any,
    now: float,
    ttl_s: float = DEFAULT_TTL_S,
    uploads: Any = None,
    default_target: Callable[[str, str, float], UploadTarget] | None = None,
    registry_logins: Any = None,
) -> SignedOffer:
    """The offer of ``spec`` to ``node_id``, signed, checked to fit in one frame.

    ``uploads`` (output path -> ``{"url", "headers"}``) are the submitter's targets, e.g.
    presigned S3 PUT URLs; each declared output without one gets ``default_target(job_id,
    path, expires_at)`` (the coordinator's artifact store) when that is given.
    ``registry_logins`` (registry host -> ``{"username", "password"}``) is a short-lived
    login for the node's pull of the image; only the image's registry may be named.

    The spec is validated as the node will (:func:`check_spec`): nothing is signed that a
    node would refuse for its form. Whether a node admits it (its policy, its GPUs) only
    the node can say, with a coded ``job_status``.

    Raises:
        JobError: ``bad_spec`` (not a JSON object), a code of :func:`check_spec`,
            ``bad_job_id``, ``bad_ttl`` (not in (0, MAX_TTL_S]), ``spec_too_large`` (the
            offer would not fit in a frame), ``bad_upload_target``, ``bad_registry_login``
            (not of that shape, or for another registry than the image's).
    """
    draft = draft_offer(
        job_id=job_id,
        node_id=node_id,
        spec=spec,
        now=now,
        ttl_s=ttl_s,
        uploads=uploads,
        registry_logins=registry_logins,
    )
    return sign_draft(key, draft, default_target)


def _load(spec: dict[str, Any]) -> WorkloadSpec:
    """The spec as the node loads it from the offer's JSON (:func:`check_spec`'s codes)."""
    try:
        return load_spec(msgspec.json.encode(spec), "json")
    except SpecError as exc:
        raise JobError(exc.code, exc.detail) from None


def receipt_problems(
    receipt: dict[str, Any],
    *,
    job_id: str,
    node_id: str,
    offer_sha256: str | None,
    prev_receipt: str,
) -> list[str]:
    """What does not hold about a receipt whose signature verified ([]: it all holds).

    Args:
        receipt: the verified receipt, as signed.
        job_id: the job id of the ``job_result`` it came in.
        node_id: the node that signed it.
        offer_sha256: the digest of the offer of ``job_id`` to this node; None when no
            such job was offered to it.
        prev_receipt: the digest of the node's previous receipt ("" before the first).

    Returns:
        Codes of :data:`RECEIPT_PROBLEMS`, in that order.
    """
    problems: list[str] = []
    # prev_receipt is checked by equality with the expected digest ("" or 64 hex digits),
    # which also checks its form; msgspec would refuse "" there (it applies the pattern of
    # Receipt's `Literal[""] | _Sha256` to the empty string too).
    fields = {k: v for k, v in receipt.items() if k != "prev_receipt"}
    chained = receipt.get("prev_receipt", "") == prev_receipt
    try:
        parsed = msgspec.convert(fields, Receipt)
    except msgspec.ValidationError:
        return ["bad_receipt"] if chained else ["bad_receipt", CHAIN_BROKEN]
    if parsed.job_id != job_id:
        problems.append("job_mismatch")
    if parsed.node_id != node_id:
        problems.append("node_mismatch")
    if offer_sha256 is None:
        problems.append("unknown_job")
    elif parsed.offer_sha256 != offer_sha256:
        problems.append("offer_mismatch")
    if parsed.state not in FINAL_STATES or parsed.state == "refused":
        problems.append("not_final")
    if not chained:
        problems.append(CHAIN_BROKEN)
    return problems
