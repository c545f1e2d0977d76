"""The job manager's world: a manager, its outbox and identity, and offers signed for it."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from agent.jobs.ledger import Ledger
from agent.jobs.manager import JobManager
from agent.link.identity import Identity
from agent.link.outbox import Outbox
from agent.protocol import crypto, dsse
from agent.protocol.bodies import EnvelopeBody, JobOfferBody
from agent.protocol.jobs import Offer, RegistryLogin, sign_offer
from agent.protocol.messages import JobCancel, JobOffer, wrap
from sandbox.docker_api import DockerClient

__all__ = [
    "COORDINATOR",
    "COORDINATOR_ID",
    "COORDINATOR_PUB",
    "World",
    "deliver",
    "offer_message",
    "spec",
]

COORDINATOR = crypto.generate_private_key()


COORDINATOR_PUB = crypto.public_key_bytes(COORDINATOR)


COORDINATOR_ID = crypto.key_id(COORDINATOR_PUB)


_seqs = itertools.count(1)


@dataclass
class World:
    manager: JobManager
    outbox: Outbox
    identity: Identity
    client: DockerClient
    image: str

    @property
    def ledger(self) -> Ledger:
        return self.manager.ledger

    def messages(self, job_id: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Every queued message (kind, body), optionally only those about one job."""
        out = []
        for entry in self.outbox.pending(0, 10_000):
            body = msgspec.json.decode(entry.body)
            if job_id is None or body.get("job_id") == job_id:
                out.append((entry.kind, body))
        return out

    def states(self, job_id: str) -> list[str]:
        return [b["state"] for kind, b in self.messages(job_id) if kind == "job_status"]

    def receipt(self, job_id: str) -> dict[str, Any]:
        [body] = [b for kind, b in self.messages(job_id) if kind == "job_result"]
        trusted = {self.identity.key_id: self.identity.public_key}
        envelope = msgspec.convert(body["receipt"], dsse.Envelope)
        return dsse.verify_receipt(envelope, trusted, self.identity.node_id)

    def log(self, job_id: str) -> str:
        return "".join(b["data"] for kind, b in self.messages(job_id) if kind == "job_log")


def offer_message(
    world: World,
    job_id: str,
    spec: dict[str, Any],
    *,
    key: crypto.PrivateKey = COORDINATOR,
    node_id: str | None = None,
    expires_in: float = 600.0,
    registry_logins: dict[str, RegistryLogin] | None = None,
) -> JobOffer:
    now = time.time()
    offer = Offer(
        job_id=job_id,
        node_id=node_id or world.identity.node_id,
        spec=spec,
        issued_at=now,
        expires_at=now + expires_in,
        registry_logins=registry_logins or {},
    )
    envelope = sign_offer(offer, key, crypto.key_id(crypto.public_key_bytes(key)))
    body = JobOfferBody(
        job_id=job_id, offer=msgspec.convert(envelope, EnvelopeBody, from_attributes=True)
    )
    message = wrap(body, next(_seqs))
    assert isinstance(message, JobOffer)
    return message


async def deliver(world: World, message: JobOffer | JobCancel) -> None:
    """Handle one coordinator message as the link does: the handler, then its seq handled."""
    if isinstance(message, JobOffer):
        await world.manager.on_offer(message)
    else:
        await world.manager.on_cancel(message)
    if world.outbox.last_coordinator_seq() < message.seq:
        world.outbox.set_last_coordinator_seq(message.seq)


def spec(image: str, script: str, **extra: Any) -> dict[str, Any]:
    return {
        "image": image,
        "command": ["sh", "-c", script],
        "timeout_s": 60,
        "grace_s": 2,
        **extra,
    }
