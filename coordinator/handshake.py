"""The coordinator's side of the handshake, up to an authenticated node; and admission.

Drives :class:`agent.protocol.connection.CoordinatorConnection` up to ``welcome``. Two checks of
:mod:`coordinator.admission` come at ``hello``, before any signing is spent on the peer:
the allow-list, and the rate of handshakes from keys the store does not know. The
enrolment token comes in ``auth``, and is checked once the node has proved its key
(:func:`check_admission`, called by the connection when it takes the node over).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from agent.protocol import crypto
from agent.protocol.connection import CoordinatorConnection
from agent.protocol.errors import AuthError, LimitExceeded
from agent.protocol.events import Close
from agent.protocol.limits import NONCE_BYTES
from agent.protocol.messages import HelloBody
from agent.protocol.session import CoordinatorHandshake, NonceBook
from coordinator.admission import Settings, TokenBucket, admit
from coordinator.compression import receive
from coordinator.keys import CoordinatorKey
from coordinator.store import Store

__all__ = [
    "CLOSE_POLICY",
    "Gate",
    "authenticate",
    "check_admission",
    "close",
    "new_nonce",
    "send",
]

#: RFC 6455 section 7.4.1: 1008 "policy violation", the close code after a closing error.
CLOSE_POLICY = 1008


@dataclass(slots=True, kw_only=True)
class Gate:
    """What every handshake of one coordinator shares."""

    key: CoordinatorKey
    store: Store
    nonces: NonceBook
    settings: Settings
    clock: Callable[[], float]
    """Wall time: nonces, what is stored."""
    monotonic: Callable[[], float]
    """Rates."""
    new_keys: TokenBucket
    """Handshakes from keys the store does not know."""


def new_nonce() -> str:
    """A fresh nonce, base64."""
    return crypto.b64encode(secrets.token_bytes(NONCE_BYTES))


async def close(ws: ServerConnection, code: int, reason: str = "") -> None:
    """Close, reading and dropping what the peer sent meanwhile.

    Reading pauses while the incoming queue is full (``max_queue``), so a peer that sent
    ahead would have its close frame wait behind its data until the close timeout.
    """
    closing = asyncio.create_task(ws.close(code, reason))
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass
    await closing


async def send(ws: ServerConnection, frames: list[str]) -> None:
    """Write each frame, in order."""
    for frame in frames:
        await ws.send(frame)


async def authenticate(
    ws: ServerConnection,
    gate: Gate,
    check_hello: Callable[[Gate, HelloBody], None] | None = None,
) -> CoordinatorConnection | None:
    """Run the handshake until the node has proved its key; None after refusing it.

    The connection returned is ``authenticated``: the caller accepts (``welcome``) or
    refuses. ``check_hello`` refuses a ``hello`` before any signing (default: the control
    link's admission checks).
    """
    at_hello = check_hello or _at_hello
    key = gate.key
    conn = CoordinatorConnection(
        key_id=key.key_id,
        sign=key.sign,
        verify=crypto.verify,
        node_id_of=crypto.node_id,
        nonces=gate.nonces,
        new_nonce=new_nonce,
        check_hello=lambda hello: at_hello(gate, hello),
    )
    while not conn.authenticated:
        try:
            async with asyncio.timeout(gate.settings.handshake_timeout_s):
                raw, _ = await receive(ws)
        except TimeoutError:
            await close(ws, CLOSE_POLICY, "handshake timed out")
            return None
        events = conn.receive_frame(raw, gate.clock())
        await send(ws, conn.frames_to_send())
        if any(isinstance(event, Close) for event in events):
            # During the handshake every error closes (docs/protocol.md, "Handshake").
            await close(ws, CLOSE_POLICY)
            return None
    return conn


def _at_hello(gate: Gate, hello: HelloBody) -> None:
    """The checks that need no proof of the key: cheap refusals before any signing."""
    settings = gate.settings
    if settings.admission == "allow_list":
        admit(settings, node_id=hello.node_id, public_key=hello.public_key, known=True, token=None)
    if gate.store.nodes.public_key(hello.node_id) is None and not gate.new_keys.try_take(
        gate.monotonic()
    ):
        raise LimitExceeded("rate_limited", "too many handshakes from new keys; retry later")


def check_admission(gate: Gate, hs: CoordinatorHandshake) -> bool:
    """Whether the authenticated node may open a session; whether the store knows it (False:
    a new node, to be recorded).

    Raises:
        AuthError: ``unknown_key`` (its id is registered with another key), or the
            admission codes of :func:`coordinator.admission.admit`.
    """
    hello = hs.hello
    assert hello is not None
    known = gate.store.nodes.public_key(hello.node_id)
    if known is not None and known != hello.public_key:
        raise AuthError("unknown_key", f"{hello.node_id} is registered with another key")
    admit(
        gate.settings,
        node_id=hello.node_id,
        public_key=hello.public_key,
        known=known is not None,
        token=hs.enrolment_token,
    )
    return known is not None
