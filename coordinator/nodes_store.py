"""The node tables of the coordinator's store: nodes, their messages, their profiles.

A node's last seq is kept in ``nodes.agent_seq``, apart from the rows of ``messages``, so
that deleting any of them (retention, quota) never moves the node's ``welcome`` back.

A profile is stored in any case once its signature verifies with the node's key; it counts
as verified hardware (``profiles``) only when it also answered a live nonce of this
coordinator. One that answered an expired, unknown or already used nonce is kept in
``unverified_profiles`` with the reason, never in ``profiles``.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, NamedTuple

import msgspec

from agent.protocol.limits import MAX_FRAME_BYTES
from coordinator.db import Database

__all__ = [
    "STORED_SIZE",
    "LatestProfile",
    "LatestSample",
    "NodeRow",
    "NodeTable",
    "Standing",
    "StoredMessage",
    "Unverified",
    "VerifiedProfile",
    "inflated_body",
]

#: A message row's bytes as stored (what quotas and retention count): its text, or its
#: deflated frame.
STORED_SIZE = "(length(CAST(body AS BLOB)) + COALESCE(length(deflated), 0))"

#: What RFC 7692 drops from the end of each compressed message (section 7.2.1).
_DEFLATE_TAIL = b"\x00\x00\xff\xff"


class _Frame(msgspec.Struct):
    body: msgspec.Raw


class _Batch(msgspec.Struct):
    """A telemetry batch with its samples left undecoded."""

    samples: list[msgspec.Raw] = []
    dropped: int = 0


class Standing(NamedTuple):
    """What decides whether and how a node's next message is stored (its row, locked)."""

    agent_seq: int
    """The highest seq stored from it (0 when none)."""
    stored_bytes: int
    """What its quota counts."""
    verified: bool
    """It has a verified profile (its full quota)."""


class LatestSample(NamedTuple):
    """A node's newest telemetry sample: the last of its newest batch."""

    seq: int
    sample: Any
    """None: the batch held none."""
    dropped: int


def inflated_body(deflated: bytes) -> bytes:
    """The JSON body of a message stored as the DEFLATE stream of its frame (RFC 7692's
    permessage-deflate, without context takeover): the text of its ``body``.

    Raises:
        ValueError: the bytes do not inflate to a frame with a body (not what was stored).
    """
    inflater = zlib.decompressobj(wbits=-zlib.MAX_WBITS)
    try:
        # Bounded as when it arrived: the frame inflated within MAX_FRAME_BYTES then.
        frame = inflater.decompress(deflated + _DEFLATE_TAIL, MAX_FRAME_BYTES + 1)
        return bytes(msgspec.json.decode(frame, type=_Frame).body)
    except (zlib.error, msgspec.DecodeError) as exc:
        raise ValueError(f"a stored frame that does not inflate: {exc}") from exc


class NodeRow(msgspec.Struct, frozen=True, kw_only=True):
    """A node as the coordinator knows it."""

    node_id: str
    public_key: str
    first_seen: float
    last_seen: float
    last_agent_seq: int


class StoredMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One reliable message an agent delivered."""

    seq: int
    type: str
    body: Any
    received: float


class VerifiedProfile(msgspec.Struct, frozen=True, kw_only=True):
    """A node's latest hardware profile whose attestation verified."""

    seq: int
    profile: dict[str, Any]
    verified_at: float


class Unverified(msgspec.Struct, frozen=True, kw_only=True):
    """Why a profile signed by its node is not verified hardware: its nonce did not hold."""

    reason: str
    """The error code: ``stale_nonce`` (expired or never issued) or ``replayed_nonce``."""
    detail: str


class LatestProfile(msgspec.Struct, frozen=True, kw_only=True):
    """A node's newest profile message, verified or not."""

    seq: int
    profile: dict[str, Any]
    received: float
    verified: bool
    unverified: Unverified | None
    """Why it is not verified (None when it is)."""


class NodeTable:
    """Nodes, the messages each sent, and their profiles."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # ------------------------------------------------------------------ nodes

    def seen(self, node_id: str, public_key: str, now: float) -> None:
        """Record a node (on first sight) and when it was last seen."""
        self._db.execute(
            "INSERT INTO nodes (node_id, public_key, first_seen, last_seen)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
            " last_seen = excluded.last_seen",
            (node_id, public_key, now, now),
        )

    def public_key(self, node_id: str) -> str | None:
        """The public key a node first presented, or None for a node never seen."""
        row = self._db.execute(
            "SELECT public_key FROM nodes WHERE node_id = ?", (node_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def all(self, *, offset: int = 0, limit: int | None = None) -> list[NodeRow]:
        """Every node (or ``limit`` of them past the first ``offset``), most recently seen
        first."""
        sql = _NODE_ROW + " ORDER BY last_seen DESC, node_id"
        page: tuple[int, ...] = () if limit is None else (limit, offset)
        rows = self._db.execute(sql + (" LIMIT ? OFFSET ?" if page else ""), page).fetchall()
        return [_node(r) for r in rows]

    def get(self, node_id: str) -> NodeRow | None:
        """One node, or None when it was never seen."""
        row = self._db.execute(_NODE_ROW + " WHERE node_id = ?", (node_id,)).fetchone()
        return None if row is None else _node(row)

    def agent_seq(self, node_id: str) -> int | None:
        """The highest seq stored from a node (0 when none); None for a node never seen."""
        row = self._db.execute(
            "SELECT agent_seq FROM nodes WHERE node_id = ?", (node_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def standing(self, node_id: str) -> Standing | None:
        """The node's :class:`Standing`, its row locked until the transaction ends (where
        the transaction does not hold the whole store already); None for a node never
        seen. One read: each is a round trip to a PostgreSQL server, per message."""
        row = self._db.execute(
            "SELECT agent_seq, stored_bytes,"
            " EXISTS (SELECT 1 FROM profiles p WHERE p.node_id = nodes.node_id)"
            " FROM nodes WHERE node_id = ?" + self._db.for_update,
            (node_id,),
        ).fetchone()
        if row is None:
            return None
        return Standing(agent_seq=int(row[0]), stored_bytes=int(row[1]), verified=bool(row[2]))

    def last_agent_seq(self, node_id: str) -> int:
        """The highest seq stored from a node (0 when none), kept when retention deletes it."""
        return self.agent_seq(node_id) or 0

    # ------------------------------------------------------------------ writes (in a transaction)

    def insert_message(
        self,
        node_id: str,
        seq: int,
        kind: str,
        body: str,
        now: float,
        *,
        deflated: bytes | None = None,
        size: int = 0,
    ) -> None:
        """Store a message as the node's last (its seq is the caller's check): its JSON
        ``body``, or its whole frame as the DEFLATE stream ``deflated`` it came in, with an
        empty ``body`` (:func:`inflated_body` reads it); ``size`` added to the bytes its
        quota counts (:class:`~coordinator.retention.Retention` keeps the total)."""
        self._db.execute(
            "INSERT INTO messages (node_id, seq, type, body, deflated, received)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (node_id, seq, kind, body, deflated, now),
        )
        self._db.execute(
            "UPDATE nodes SET agent_seq = ?, stored_bytes = stored_bytes + ? WHERE node_id = ?",
            (seq, size, node_id),
        )

    def insert_profile(
        self,
        node_id: str,
        seq: int,
        profile: dict[str, Any],
        now: float,
        unverified: Unverified | None,
    ) -> None:
        """Make the profile of message ``seq`` the node's verified one, or keep it beside
        as unverified for the reason ``unverified`` gives."""
        data = msgspec.json.encode(profile).decode()
        if unverified is not None:
            self._db.execute(
                "INSERT INTO unverified_profiles (node_id, seq, profile, reason, detail)"
                " VALUES (?, ?, ?, ?, ?)",
                (node_id, seq, data, unverified.reason, unverified.detail),
            )
            return
        self._db.execute(
            "INSERT INTO profiles (node_id, seq, profile, verified_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
            " seq = excluded.seq, profile = excluded.profile,"
            " verified_at = excluded.verified_at",
            (node_id, seq, data, now),
        )

    # ------------------------------------------------------------------ messages and profiles

    def messages(
        self,
        node_id: str,
        kind: str,
        *,
        since_seq: int = 0,
        limit: int = 1000,
        max_bytes: int | None = None,
    ) -> list[StoredMessage]:
        """A node's messages of one type after ``since_seq``, in seq order; with
        ``max_bytes``, no more than their text holds (at least one message): what is
        stored deflated may be a thousand times that once inflated."""
        rows = self._db.execute(
            "SELECT seq, type, body, deflated, received FROM messages"
            " WHERE node_id = ? AND type = ? AND seq > ? ORDER BY seq LIMIT ?",
            (node_id, kind, since_seq, limit),
        ).fetchall()
        messages: list[StoredMessage] = []
        size = 0
        for seq, kind_, body, deflated, received in rows:
            text = body if deflated is None else inflated_body(bytes(deflated))
            size += len(text)
            if max_bytes is not None and messages and size > max_bytes:
                break
            messages.append(_message(seq, kind_, text, received))
        return messages

    def latest_sample(self, node_id: str) -> LatestSample | None:
        """A node's newest telemetry sample (only that one is decoded of its batch)."""
        row = self._db.execute(
            "SELECT seq, body, deflated FROM messages"
            " WHERE node_id = ? AND type = 'telemetry' ORDER BY seq DESC LIMIT 1",
            (node_id,),
        ).fetchone()
        if row is None:
            return None
        seq, body, deflated = row
        batch = msgspec.json.decode(
            body if deflated is None else inflated_body(bytes(deflated)), type=_Batch
        )
        sample = _decoded(bytes(batch.samples[-1])) if batch.samples else None
        return LatestSample(seq=seq, sample=sample, dropped=batch.dropped)

    def count(self) -> int:
        """How many nodes the store knows."""
        return int(self._db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0])

    def latest(self, node_id: str, kind: str) -> StoredMessage | None:
        """A node's newest message of one type."""
        row = self._db.execute(
            "SELECT seq, type, body, deflated, received FROM messages"
            " WHERE node_id = ? AND type = ? ORDER BY seq DESC LIMIT 1",
            (node_id, kind),
        ).fetchone()
        return None if row is None else _stored(row)

    def job_progress(self, node_id: str, job_id: str) -> tuple[int, int] | None:
        """A pulling or fetching job's latest progress, (bytes done, bytes in all), from
        the newest ``job_status`` the node sent about it; None when it carried none."""
        row = self._db.execute(
            "SELECT body FROM messages WHERE node_id = ? AND type = 'job_status'"
            " AND json_extract(body, '$.job_id') = ? ORDER BY seq DESC LIMIT 1",
            (node_id, job_id),
        ).fetchone()
        if row is None:
            return None
        body = msgspec.json.decode(row[0])
        layers = body.get("progress") or body.get("inputs") or []
        if not isinstance(layers, list) or not layers:
            return None
        done = sum(int(layer.get("done", 0)) for layer in layers if isinstance(layer, dict))
        total = sum(int(layer.get("total", 0)) for layer in layers if isinstance(layer, dict))
        return done, total

    def all_seqs(self, node_id: str) -> list[int]:
        """Every seq stored from a node, in order (what the no-gap tests check)."""
        rows = self._db.execute(
            "SELECT seq FROM messages WHERE node_id = ? ORDER BY seq", (node_id,)
        ).fetchall()
        return [int(r[0]) for r in rows]

    def profile(self, node_id: str) -> VerifiedProfile | None:
        """A node's latest verified hardware profile."""
        row = self._db.execute(
            "SELECT seq, profile, verified_at FROM profiles WHERE node_id = ?", (node_id,)
        ).fetchone()
        if row is None:
            return None
        return VerifiedProfile(seq=row[0], profile=msgspec.json.decode(row[1]), verified_at=row[2])

    def latest_profile(self, node_id: str) -> LatestProfile | None:
        """A node's newest profile, whether it verified and, if not, why."""
        latest = self.latest(node_id, "profile")
        if latest is None:
            return None
        verified = self.profile(node_id)
        if verified is not None and verified.seq == latest.seq:
            return LatestProfile(
                seq=latest.seq,
                profile=verified.profile,
                received=latest.received,
                verified=True,
                unverified=None,
            )
        row = self._db.execute(
            "SELECT profile, reason, detail FROM unverified_profiles WHERE node_id = ? AND seq = ?",
            (node_id, latest.seq),
        ).fetchone()
        profile: dict[str, Any] = {} if row is None else msgspec.json.decode(row[0])
        reason = (
            Unverified(reason="unknown", detail="no verification recorded")
            if row is None
            else Unverified(reason=row[1], detail=row[2])
        )
        return LatestProfile(
            seq=latest.seq,
            profile=profile,
            received=latest.received,
            verified=False,
            unverified=reason,
        )


_NODE_ROW = "SELECT node_id, public_key, first_seen, last_seen, agent_seq FROM nodes"


def _node(row: Any) -> NodeRow:
    node_id, public_key, first_seen, last_seen, agent_seq = row
    return NodeRow(
        node_id=node_id,
        public_key=public_key,
        first_seen=first_seen,
        last_seen=last_seen,
        last_agent_seq=agent_seq,
    )


def _stored(row: Any) -> StoredMessage:
    """A message from its row: seq, type, body, deflated, received."""
    seq, kind, body, deflated, received = row
    text = body if deflated is None else inflated_body(bytes(deflated))
    return _message(seq, kind, text, received)


def _message(seq: int, kind: str, text: str | bytes, received: float) -> StoredMessage:
    return StoredMessage(seq=seq, type=kind, body=_decoded(text), received=received)


def _decoded(text: str | bytes) -> Any:
    """A stored body's JSON. A telemetry reading past a float's range (``1e400``) was
    stored as it came (samples are checked as JSON, not decoded): Python's parser reads it
    as an infinity, which an answer encodes as null, where msgspec's refuses it."""
    try:
        return msgspec.json.decode(text)
    except msgspec.ValidationError:
        return json.loads(text)
