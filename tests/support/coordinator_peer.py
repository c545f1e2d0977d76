"""A test agent that speaks the protocol to a coordinator, for the coordinator's job tests.

Written with the protocol's own machines (AgentHandshake, crypto, dsse, jobs), independent
of the daemon. Like a real agent it stores and acknowledges every reliable message of the
coordinator's stream once (a resend of one it has is acknowledged again, and not kept
twice), and numbers what it sends across connections.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import msgspec
from websockets.asyncio.client import ClientConnection, connect

from agent.protocol import crypto, dsse
from agent.protocol.jobs import Offer, Receipt, offer_digest, receipt_digest, verify_offer
from agent.protocol.messages import (
    COORDINATOR_SENDS,
    Ack,
    AckBody,
    EnvelopeBody,
    Error,
    JobLogBody,
    JobOffer,
    JobResultBody,
    JobStatusBody,
    ReliableBody,
    ReliableMessage,
    Welcome,
    decode_frame,
    encode_frame,
    wrap,
)
from agent.protocol.session import AgentHandshake, HandshakeState

__all__ = ["Peer", "PeerLink", "connected", "signed_receipt"]

_TIMEOUT_S = 5.0


class Peer:
    """A test agent's identity and what it stored: the state that outlives a connection."""

    def __init__(self) -> None:
        self.key = crypto.generate_private_key()
        self.public_key = crypto.public_key_bytes(self.key)
        self.node_id = crypto.node_id(self.public_key)
        self.key_id = crypto.key_id(self.public_key)
        self.stored: list[ReliableMessage] = []
        """Every message of the coordinator's stream, once each, in seq order."""
        self.last_seq = 0
        """The last seq of its own stream it sent (and had acknowledged)."""
        self.last_receipt = ""
        """The digest of its last receipt: the next one's prev_receipt."""

    @property
    def last_coordinator_seq(self) -> int:
        return self.stored[-1].seq if self.stored else 0

    def of_type(self, kind: type[Any]) -> list[Any]:
        """The stored messages of one frame type."""
        return [m for m in self.stored if isinstance(m, kind)]


def signed_receipt(
    peer: Peer, offer: Offer, *, prev: str | None = None, **fields: Any
) -> JobResultBody:
    """A ``job_result`` body for ``offer``, signed by ``peer``; chained unless ``prev``."""
    values: dict[str, Any] = {
        "job_id": offer.job_id,
        "node_id": peer.node_id,
        "state": "completed",
        "offer_sha256": offer_digest(offer),
        "spec_digest": "sha256:" + "0" * 64,
        "exit_code": 0,
        "prev_receipt": peer.last_receipt if prev is None else prev,
    }
    values.update(fields)
    receipt = msgspec.to_builtins(Receipt(**values))
    envelope = dsse.attest_receipt(receipt, peer.node_id, peer.key, peer.key_id)
    peer.last_receipt = receipt_digest(receipt)
    body = msgspec.convert(msgspec.to_builtins(envelope), EnvelopeBody)
    return JobResultBody(job_id=values["job_id"], receipt=body)


class PeerLink:
    """One open session of a :class:`Peer`."""

    def __init__(self, ws: ClientConnection, peer: Peer, welcome: Welcome) -> None:
        self.ws = ws
        self.peer = peer
        self.welcome = welcome
        self.new: list[ReliableMessage] = []
        """Messages stored during this session, not yet taken by :meth:`take`."""
        self.errors: list[Error] = []
        self._acked = welcome.body.last_agent_seq

    async def take(self, kind: type[Any]) -> Any:
        """The next new message of a type this session (reading until one arrives)."""
        while True:
            for index, message in enumerate(self.new):
                if isinstance(message, kind):
                    return self.new.pop(index)
            await self._read_one()

    async def send(self, body: ReliableBody) -> int:
        """Send ``body`` with the next seq; return once the coordinator acknowledged it."""
        self.peer.last_seq += 1
        seq = self.peer.last_seq
        await self.ws.send(encode_frame(wrap(body, seq)))
        while self._acked < seq:
            await self._read_one()
        return seq

    async def status(self, job_id: str, state: str, code: str = "", detail: str = "") -> int:
        return await self.send(JobStatusBody(job_id=job_id, state=state, code=code, detail=detail))

    async def log(
        self, job_id: str, data: str, stream: Literal["stdout", "stderr"] = "stdout"
    ) -> int:
        return await self.send(JobLogBody(job_id=job_id, stream=stream, data=data))

    def verify(self, offer: JobOffer, pinned: dict[str, bytes]) -> Offer:
        """The offer, verified as an agent does (agent.protocol.jobs.verify_offer)."""
        envelope = msgspec.convert(msgspec.to_builtins(offer.body.offer), dsse.Envelope)
        return verify_offer(
            envelope, pinned, job_id=offer.body.job_id, node_id=self.peer.node_id, now=time.time()
        )

    async def _read_one(self) -> None:
        async with asyncio.timeout(_TIMEOUT_S):
            message = decode_frame(await self.ws.recv(), accept=COORDINATOR_SENDS)
        if isinstance(message, Ack):
            self._acked = max(self._acked, message.body.seq)
        elif isinstance(message, Error):
            self.errors.append(message)
        else:
            seq = getattr(message, "seq", None)
            assert seq is not None, f"unexpected {message!r}"
            if seq > self.peer.last_coordinator_seq:
                assert seq == self.peer.last_coordinator_seq + 1, f"gap before {seq}"
                self.peer.stored.append(message)  # type: ignore[arg-type]
                self.new.append(message)  # type: ignore[arg-type]
            await self.ws.send(encode_frame(Ack(v=1, body=AckBody(seq=seq))))


@asynccontextmanager
async def connected(url: str, pinned: dict[str, bytes], peer: Peer) -> AsyncIterator[PeerLink]:
    """Connect ``peer`` and run the handshake; fails the test if the coordinator refuses."""
    async with connect(url) as ws:
        hs = AgentHandshake(
            node_id=peer.node_id,
            public_key=peer.public_key,
            sign=lambda data: crypto.sign(peer.key, data),
            verify=crypto.verify,
            pinned_keys=pinned,
            agent_version="0.1.0",
            nonce=crypto.b64encode(secrets.token_bytes(32)),
            last_coordinator_seq=peer.last_coordinator_seq,
            now=time.time(),
        )
        while hs.state is not HandshakeState.OPEN:
            for message in hs.messages_to_send():
                await ws.send(encode_frame(message))
            async with asyncio.timeout(_TIMEOUT_S):
                answer = decode_frame(await ws.recv(), accept=COORDINATOR_SENDS)
            assert not isinstance(answer, Error), f"refused: {answer}"
            hs.receive(answer, time.time())
        assert hs.welcome is not None
        yield PeerLink(ws, peer, Welcome(v=1, body=hs.welcome))
