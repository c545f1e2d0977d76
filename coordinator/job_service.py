"""The coordinator's jobs: what the API and the agents' connections both call.

Jobs flow one way. An offer or a cancel comes from the API (or a caller in the
coordinator's process), is signed and checked (:mod:`coordinator.offers`), stored with its
message of the node's stream (:class:`coordinator.jobs_store.JobTable`), and handed to the
node's open session, if any, through :class:`Sessions` (the server's sessions by node id);
a node not connected gets it after its next handshake. What a node says about its jobs
(``job_status``, ``job_log``, ``job_result``) comes from its connection to :meth:`report`,
which stores the message and applies it to the job in one commit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeAlias

import msgspec

from agent.protocol import crypto, dsse
from agent.protocol.jobs import FINAL_STATES
from agent.protocol.limits import MAX_ERROR_DETAIL_CHARS
from agent.protocol.messages import (
    ImagePrefetchBody,
    JobCancelBody,
    JobLog,
    JobResult,
    JobStatus,
    ServiceRenewBody,
    message_type,
)
from agent.protocol.uploads import UploadTarget
from coordinator.artifacts import ArtifactStore
from coordinator.errors import JobError
from coordinator.images import ImagePinner
from coordinator.jobs_store import JobEvent, JobLogs, JobRow, JobSummary, VerifiedResult
from coordinator.keys import CoordinatorKey
from coordinator.offers import DEFAULT_TTL_S, draft_offer, new_job_id, repin, sign_draft
from coordinator.store import Added, Store
from oci import Credentials

__all__ = ["JobMessage", "JobService", "Sessions"]

#: What a node sends about one of its jobs.
JobMessage: TypeAlias = JobStatus | JobLog | JobResult


class Sessions(Protocol):
    """The server's open sessions by node id: how a message just stored reaches its node.

    A message is numbered by the store as it is stored
    (:meth:`coordinator.stream_store.StreamTable.insert_outbound`), then :meth:`deliver`
    has the node's session send what it has not sent; a session that opens later reads
    it from the store, and one on another coordinator is told by the store.
    """

    async def deliver(self, node_id: str) -> None:
        """Send the node what is stored for it and not sent yet, if its session is here."""


class JobService:
    """Offers, cancels and lease renewals out, job reports in, the jobs as stored."""

    def __init__(
        self,
        store: Store,
        key: CoordinatorKey,
        sessions: Sessions,
        clock: Callable[[], float],
        pinner: ImagePinner | None = None,
        *,
        artifacts: ArtifactStore | None = None,
        artifacts_url: Callable[[], str] | None = None,
    ) -> None:
        self.artifacts = artifacts
        """The coordinator's own store for outputs; None: only the submitter's targets."""
        self._artifacts_url = artifacts_url
        self._store = store
        self._key = key
        self._sessions = sessions
        self._clock = clock
        self._pinner = pinner or ImagePinner()

    async def submit(
        self,
        node_id: str,
        spec: dict[str, Any],
        *,
        job_id: str | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        uploads: Any = None,
        registry_logins: Any = None,
    ) -> str:
        """Sign an offer of ``spec`` to ``node_id``, store it, send it; returns the job id.

        The offer goes out at once if the node is connected, else after its next handshake
        (it is in the store: a restart of the coordinator does not lose it). The node answers
        with ``job_status`` messages, which :meth:`get` then shows.

        Args:
            job_id: ``job-`` and 16 random hex digits when None.
            ttl_s: how long the offer stays valid; a node that gets it later refuses it.
            uploads: output path -> ``{"url", "headers"}`` the node PUTs it to (presigned
                URLs); the other outputs go to the coordinator's artifact store.
            registry_logins: registry host -> ``{"username", "password"}``, a short-lived
                login to the image's registry: used to pin its tag, and carried in the
                offer for the node's pull (the node's own logins are not needed then).

        An image named by a tag is pinned to its digest first (:mod:`coordinator.images`):
        the offer carries ``repository@sha256:...``, and the node refuses a tag.

        Raises:
            JobError: ``unknown_node`` (never connected), ``job_exists``, ``bad_job_id``,
                ``bad_spec`` (not a JSON object), ``bad_ttl``, ``spec_too_large``, and the
                registry's codes when a tag cannot be pinned (``image_not_found``,
                ``registry_unreachable``, ``registry_auth_failed``, ...), ``bad_value`` (the
                pinned reference is too long for a node to read).
        """
        store = self._store
        if not isinstance(node_id, str) or store.nodes.public_key(node_id) is None:
            raise JobError("unknown_node", f"no node {node_id!r} ever connected")
        job_id = new_job_id() if job_id is None else job_id
        if store.jobs.get(job_id) is not None:
            raise JobError("job_exists", f"job {job_id!r} exists")
        # Checked once, as the node will, before any registry is asked; signed once pinned.
        draft = draft_offer(
            job_id=job_id,
            node_id=node_id,
            spec=spec,
            now=self._clock(),
            ttl_s=ttl_s,
            uploads=uploads,
            registry_logins=registry_logins,
        )
        logins = {
            host: Credentials(login.username, login.password)
            for host, login in draft.offer.registry_logins.items()
        }
        pinned = await self._pinner.pin(draft.offer.spec, logins)
        if pinned is not draft.offer.spec:
            draft = repin(draft, pinned.get("image"), self._clock())
        signed = sign_draft(self._key, draft, self._default_target())
        # Stored before it is sent, under the seq the store gives it: a store that fails
        # leaves no gap, and the node may acknowledge it after a restart of ours.
        store.jobs.add(signed, signed.offer.issued_at)
        await self._sessions.deliver(node_id)
        return job_id

    async def cancel(self, job_id: str, reason: str = "") -> None:
        """Ask the job's node to stop it (``job_cancel``); it then reports ``cancelled``.

        Asking again while a cancel is under way sends nothing more. A job not yet
        delivered still gets its offer first, then the cancel: the stream keeps its order.

        Raises:
            JobError: ``unknown_job``, ``job_final`` (it ended already), ``bad_reason``
                (over 1024 characters).
        """
        job = self._store.jobs.get(job_id)
        if job is None:
            raise JobError("unknown_job", f"no job {job_id!r}")
        if job.state in FINAL_STATES:
            raise JobError("job_final", f"job {job_id!r} is {job.state} already")
        if not isinstance(reason, str) or len(reason) > MAX_ERROR_DETAIL_CHARS:
            raise JobError("bad_reason", f"a reason is at most {MAX_ERROR_DETAIL_CHARS} characters")
        if job.cancel_requested is not None:
            return
        body = JobCancelBody(job_id=job_id, reason=reason)
        self._store.jobs.add_cancel(job.node_id, body, self._clock())
        await self._sessions.deliver(job.node_id)

    async def renew(self, job_id: str, until: float) -> None:
        """Extend a running service's lease to ``until`` (``service_renew``), unless the
        job has ended. ``until`` is a time within the wire's bounds."""
        job = self._store.jobs.get(job_id)
        if job is None or job.state in FINAL_STATES:
            return
        body = ServiceRenewBody(job_id=job_id, lease_until=until)
        self._store.streams.add_outbound(job.node_id, "service_renew", msgspec.to_builtins(body))
        await self._sessions.deliver(job.node_id)

    async def prefetch(self, node_id: str, image: str) -> str:
        """Ask ``node_id`` to pull ``image`` now (``image_prefetch``), so that the first job
        on it does not wait for the pull; a tag is pinned to its digest first. Returns the
        pinned reference.

        Raises:
            JobError: ``unknown_node``, ``bad_image`` (not an image reference, or a local
                image id: a node cannot pull that), and the registry's codes of a tag that
                cannot be pinned.
        """
        store = self._store
        if not isinstance(node_id, str) or store.nodes.public_key(node_id) is None:
            raise JobError("unknown_node", f"no node {node_id!r} ever connected")
        if not isinstance(image, str):
            raise JobError("bad_image", "an image is a string")
        pinned = (await self._pinner.pin({"image": image}))["image"]
        try:
            body = msgspec.convert({"image": pinned}, ImagePrefetchBody)
        except msgspec.ValidationError:
            raise JobError(
                "bad_image", f"{image!r}: a node pulls name@sha256:<digest> (or a tag of one)"
            ) from None
        store.streams.add_outbound(node_id, "image_prefetch", msgspec.to_builtins(body))
        await self._sessions.deliver(node_id)
        return body.image

    def report(self, node_id: str, message: JobMessage, now: float) -> Added:
        """Store what ``node_id`` says about a job, and apply it to the job, in one commit.

        A receipt that does not verify with the node's key is refused; one that verifies is
        stored, and what else does not hold is recorded on the job
        (:func:`coordinator.offers.receipt_problems`).

        Raises:
            AuthError: the receipt is not signed by the node's key, or not about the node.
        """
        body = msgspec.to_builtins(message.body)
        job: JobEvent
        if isinstance(message, JobResult):
            envelope = msgspec.convert(body["receipt"], dsse.Envelope)  # a superset of the body's
            receipt = dsse.verify_receipt(envelope, self._trusted(node_id), node_id)
            job = VerifiedResult(
                job_id=message.body.job_id, receipt=receipt, envelope=body["receipt"]
            )
        else:
            job = message.body
        return self._store.add(node_id, message.seq, message_type(message), body, now, job=job)

    def progress(self, job: JobSummary) -> tuple[int, int] | None:
        """How far a pulling job's image pull or a fetching job's inputs are, (bytes done,
        in all), as last reported."""
        return self._store.nodes.job_progress(job.node_id, job.job_id)

    def get(self, job_id: str) -> JobRow | None:
        """One job, or None when there is no such job."""
        return self._store.jobs.get(job_id)

    def recent(self, *, node_id: str | None = None, limit: int = 1000) -> list[JobSummary]:
        """Jobs, newest first (of one node when ``node_id`` is given)."""
        return self._store.jobs.recent(node_id=node_id, limit=limit)

    def logs(self, job_id: str) -> JobLogs:
        """A job's kept log text per stream."""
        return self._store.jobs.logs(job_id)

    def _default_target(self) -> Callable[[str, str, float], UploadTarget] | None:
        artifacts, base = self.artifacts, self._artifacts_url
        if artifacts is None or base is None:
            return None
        url = base()
        return lambda job_id, path, expires: artifacts.target(url, job_id, path, expires)

    def _trusted(self, node_id: str) -> dict[str, bytes]:
        public_key = crypto.b64decode(self._store.nodes.public_key(node_id) or "")
        return {crypto.key_id(public_key): public_key}
