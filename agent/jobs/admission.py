"""An offer at the node's door: verified, admitted, its GPUs reserved, or refused with a code.

The job manager hands each ``job_offer`` here and carries out the :class:`Decision` that
comes back (:mod:`agent.jobs.machine`): ``accepted`` with the GPUs reserved, or
``refused`` with the first reason found, in this order: the signature and the node
(an offer that does not verify is not recorded: its id is only what the unsigned frame
says), the node's holds, the spec, a pinned image, the policy, the upload targets (their
form, then their hosts: ``policy.allowed_upload_hosts``), the registry login, the running
jobs, the GPUs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import msgspec

from agent.jobs import machine
from agent.jobs.delivery import Delivery
from agent.jobs.ledger import Ledger
from agent.jobs.machine import Decision
from agent.jobs.node import NodeState
from agent.link.identity import Identity
from agent.protocol import dsse
from agent.protocol.errors import AuthError, DecodeError
from agent.protocol.jobs import Offer, RegistryLogins, verify_offer
from agent.protocol.limits import MAX_ERROR_DETAIL_CHARS
from agent.protocol.messages import JobOffer
from agent.protocol.uploads import UploadTarget, check_uploads
from sandbox.errors import PolicyViolation, SandboxError
from sandbox.policy import COORDINATOR_HOST, Policy, admit
from sandbox.spec import ImageRef, WorkloadSpec, load_spec
from sandbox.urls import host_allowed

__all__ = ["OfferDesk"]

_log = logging.getLogger(__name__)


class OfferDesk:
    """Decides each offer; what changes while the agent runs is read when it is asked."""

    def __init__(
        self,
        *,
        identity: Identity,
        ledger: Ledger,
        node: NodeState,
        trusted_keys: dict[str, bytes],
        clock: Callable[[], float],
        policy: Callable[[], Policy],
        limit: Callable[[], int],
        running: Callable[[], int],
        delivery: Delivery | None,
        coordinator_host: str | None = None,
    ) -> None:
        self.identity = identity
        self.ledger = ledger
        self.node = node
        self.trusted_keys = trusted_keys
        self.clock = clock
        self.policy = policy
        self.limit = limit
        self.running = running
        self.delivery = delivery
        self.coordinator_host = coordinator_host
        """What ``@coordinator`` in ``allowed_upload_hosts`` means (None: nothing)."""

    def decide(self, message: JobOffer) -> Decision:
        """Accept an offer (its GPUs reserved) or refuse it, as the pure machine decides."""
        job_id = message.body.job_id
        known = self.ledger.get(job_id)
        if known is not None:
            # Ids run once. The same offer again (a coordinator that lost its ack) gets
            # the job's current state, not a second run.
            _log.info("offer for known job %s (%s): not run again", job_id, known.state)
            return machine.answer_known(job_id, known.state)
        self.node.free(job_id)  # a reservation whose answer never got stored
        try:
            offer, spec = self._admit(message)
            units = self._reserve(job_id, spec)
            delivery = self.delivery
            if offer.uploads and not (delivery and delivery.reserve(job_id, spec.output_max_bytes)):
                self.node.free(job_id)
                raise _Refusal("spool_full", "the node's output spool cannot hold this job's")
        except _Refusal as refusal:
            _log.info("refused job %s: %s %s", job_id, refusal.code, refusal.detail)
            return machine.refuse(job_id, refusal.code, refusal.detail, verified=refusal.verified)
        return machine.accept(offer, msgspec.json.encode(offer), spec, units)

    def _admit(self, message: JobOffer) -> tuple[Offer, WorkloadSpec]:
        job_id = message.body.job_id
        try:
            envelope = msgspec.convert(msgspec.to_builtins(message.body.offer), dsse.Envelope)
            offer = verify_offer(
                envelope,
                self.trusted_keys,
                job_id=job_id,
                node_id=self.identity.node_id,
                now=self.clock(),
            )
        except AuthError as exc:
            raise _Refusal(exc.code, exc.detail, verified=False) from None
        if offer.uploads and self.delivery is None:
            raise _Refusal("bad_upload_target", "this node has no output spool")
        if (held := self.node.unavailable) is not None:
            raise _Refusal(*held)
        try:
            spec = load_spec(msgspec.json.encode(offer.spec), "json")
            if not spec.image_ref.is_pinned:
                # What runs must be what was signed: a tag can move after the signature.
                raise _Refusal(
                    "image_not_pinned",
                    f"image {spec.image} is a tag; an offer names it by digest (name@sha256:...)"
                    " or by local image id (sha256:...)",
                )
            policy = self.policy()
            admit(spec, policy, offered_vendors=self._vendors())
            check_uploads(offer.uploads, spec.outputs)
            self._check_upload_hosts(offer.uploads, policy.allowed_upload_hosts)
            _check_logins(offer.registry_logins, spec.image_ref)
        except DecodeError as exc:
            raise _Refusal(exc.code, exc.detail) from None
        except PolicyViolation as exc:
            detail = "; ".join(f"{v.code}: {v.message}" for v in exc.violations)
            raise _Refusal(exc.code, detail) from None
        except SandboxError as exc:
            raise _Refusal(exc.code, exc.detail) from None
        # An upload holds no slot, no GPU.
        running = self.running()
        if self.limit() and running >= self.limit():
            raise _Refusal("busy", f"{running} job(s) running, the limit")
        if not self.node.scheduler.could_ever_fit(spec.gpus):
            raise _Refusal("no_matching_gpus", "this node has no GPUs that meet the spec")
        return offer, spec

    def _check_upload_hosts(self, uploads: Mapping[str, UploadTarget], allowed: list[str]) -> None:
        """Refuse an offer that would send outputs to a host the node owner did not list."""
        patterns = [p for p in allowed if p != COORDINATOR_HOST]
        if COORDINATOR_HOST in allowed and self.coordinator_host:
            patterns.append(self.coordinator_host)
        for path, target in sorted(uploads.items()):
            if not host_allowed(target.url, patterns):
                # The host only: the rest of a presigned URL is a credential.
                host = urlsplit(target.url).hostname
                raise _Refusal(
                    "upload_host_refused",
                    f"output {path!r}: uploads to {host} are not allowed here"
                    " (policy.allowed_upload_hosts)",
                )

    def _reserve(self, job_id: str, spec: WorkloadSpec) -> list[str]:
        units = self.node.assign(job_id, spec.gpus)
        if units is None:
            raise _Refusal("busy", f"no {spec.gpus.count} free healthy GPU(s) fit the spec now")
        return units

    def _vendors(self) -> frozenset[str]:
        return frozenset(u.gpu.vendor for u in self.node.scheduler.units.values())


def _check_logins(logins: RegistryLogins, image: ImageRef) -> None:
    """A login an offer carries is for its image's registry, and for nothing else: the
    node hands it to the engine for that one pull."""
    registry = image.repository.split("/", 1)[0] if image.repository else None
    for host in logins:
        if host != registry:
            what = f"the registry {registry}" if registry else "no registry (a local image)"
            raise _Refusal("bad_registry_login", f"a login for {host}; the image is from {what}")


class _Refusal(Exception):
    def __init__(self, code: str, detail: str, *, verified: bool = True) -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail[:MAX_ERROR_DETAIL_CHARS]
        self.verified = verified
        """Whether the offer verified: only then is its job id its own, and recorded."""
