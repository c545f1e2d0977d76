"""Requests for a service whose node's data connection another coordinator holds.

With several coordinators on one database (docs/coordinator.md), a node's tunnel ends at
one of them, and a client may call the gateway of any. The gateway that took the request
keeps doing what it does for a replica of its own (the client's key and rate, the record,
the retry, the keep-alive of the client), and asks the holder for a plain byte stream to
the replica: ``GET /_peer/streams/{node}/{job}`` on the holder's gateway, upgraded (101) to
raw bytes that the holder relays into a tunnel stream of its own, both ways, half-closes
and resets included (a reset is the TCP connection aborted). The holder gives the URL
its peers reach it at (``serve --peer-url``) in the store (:mod:`coordinator.presence_store`).

A peer proves itself with the coordinators' shared signing key (every coordinator on a
database holds the same one): ``gpu-peer-auth: <unix time>:<HMAC-SHA256>`` over the time,
node and job, with a key derived from the private key (HKDF), checked within
:data:`SKEW_S`. Anyone else is refused ``bad_peer`` (403) before anything is opened. The
peers' link carries the clients' requests as they are: give ``--peer-url`` an ``https``
address (or a private network) between machines.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time
import urllib.parse
from collections.abc import Callable
from typing import Final

import h11
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from coordinator.cli_args import NODE_ID
from coordinator.errors import GatewayError, StreamError
from coordinator.gateway.client_conn import ClientConnection
from coordinator.keys import CoordinatorKey
from coordinator.tunnel import Tunnels, TunnelStream

__all__ = ["PATH_PREFIX", "SKEW_S", "UPGRADE", "PeerAuth", "serve_peer"]

#: Where a peer's requests go on a gateway.
PATH_PREFIX: Final = b"/_peer/"
#: How far a peer's clock (its request's time) may be from ours.
SKEW_S: Final = 30.0
#: Opening a stream through a peer: connecting and its answer, at most.
_PATH = re.compile(r"/_peer/streams/([^/?#]{1,512})/([^/?#]{1,512})")
#: A job id is a tunnel target as the agent takes it.
_TARGET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
#: The protocol a peer's stream is upgraded to: raw bytes.
UPGRADE: Final = b"gpu-agent-stream"
_SWITCHED: Final = (
    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: " + UPGRADE + b"\r\n\r\n"
)
_READ: Final = 64 * 1024
#: A tunnel stream's reads: what it holds by then, as the gateway's own (upstream.py), so
#: that each leaves it empty and the tunnel grows its window.
_STREAM_READ: Final = 512 * 1024


class PeerAuth:
    """The proof a peer gives, from the coordinators' shared key."""

    def __init__(self, key: CoordinatorKey, clock: Callable[[], float] = time.time) -> None:
        raw = key.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        hkdf = HKDF(hashes.SHA256(), 32, salt=None, info=b"gpu-agent gateway peer v1")
        self._secret = hkdf.derive(raw)
        self._clock = clock

    def header(self, node_id: str, job_id: str) -> str:
        """The ``gpu-peer-auth`` value for a stream to ``job_id`` on ``node_id``, now."""
        at = int(self._clock())
        return f"{at}:{self._mac(at, node_id, job_id)}"

    def check(self, value: str | None, node_id: str, job_id: str) -> bool:
        """Whether ``value`` proves a peer asked for this stream, lately."""
        if value is None:
            return False
        at_text, _, mac = value.partition(":")
        # ASCII digits only: "²" is a digit to isdigit(), and no number to int().
        if not (at_text.isascii() and at_text.isdigit()) or len(at_text) > 12:
            return False
        at = int(at_text)
        if abs(self._clock() - at) > SKEW_S:
            return False
        return hmac.compare_digest(mac, self._mac(at, node_id, job_id))

    def _mac(self, at: int, node_id: str, job_id: str) -> str:
        message = f"{at}\n{node_id}\n{job_id}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()


# ------------------------------------------------------------------ the holder's side


async def serve_peer(
    request: h11.Request, client: ClientConnection, tunnels: Tunnels, auth: PeerAuth
) -> None:
    """Answer a peer's request for a stream: relay it into a tunnel stream of ours.

    Raises:
        GatewayError: ``not_found`` (not a stream's path), ``method_not_allowed``,
            ``bad_peer`` (no valid proof), ``upstream_error`` (no stream to it here:
            the code in the detail); answered by the caller, nothing opened.
    """
    match = _PATH.fullmatch(request.target.decode("latin-1"))
    if match is None:
        raise GatewayError("not_found", "no such peer path")
    if request.method != b"GET":
        raise GatewayError("method_not_allowed", "GET /_peer/streams/{node}/{job}")
    try:
        node_id, job_id = (urllib.parse.unquote(p, errors="strict") for p in match.groups())
    except UnicodeDecodeError:
        raise GatewayError("not_found", "no such node or job") from None
    if not NODE_ID.fullmatch(node_id) or not _TARGET.fullmatch(job_id):
        raise GatewayError("not_found", "no such node or job")
    headers = {n.decode("latin-1"): v.decode("latin-1") for n, v in request.headers}
    if not auth.check(headers.get("gpu-peer-auth"), node_id, job_id):
        raise GatewayError("bad_peer", "not a coordinator of this network")
    reader, writer = client.take_over(request)
    try:
        stream = tunnels.open(node_id, job_id)
    except StreamError as exc:
        raise GatewayError("upstream_error", exc.code) from None
    async with stream:
        writer.write(_SWITCHED)
        await _relay(reader, writer, stream)


async def _relay(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stream: TunnelStream
) -> None:
    """The peer's bytes into the stream and the stream's to the peer, until both ended; a
    failure either side resets the stream and aborts the connection."""

    async def up() -> None:
        while data := await reader.read(_READ):
            await stream.write(data)
        await stream.write_eof()

    async def down() -> None:
        while data := await stream.read(_STREAM_READ):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    try:
        for done in asyncio.as_completed(tasks):
            await done
    except (StreamError, ConnectionError):
        stream.reset()
        writer.transport.abort()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
