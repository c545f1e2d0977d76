"""Errors of the wire protocol.

Every error has a stable ``code`` that travels in an ``error`` message, and is grouped by
how the receiving side reacts::

    ProtocolError                 base; never raised itself
    +-- DecodeError               a frame that is not a valid message: answer error, go on
    |     codes: bad_json, bad_message, unknown_type, bad_version, frame_too_large,
    |            binary_frame (the protocol is text frames only)
    +-- AuthError                 identity or signature does not hold: answer error, close
    |     codes: bad_signature, unknown_key, untrusted_key, replayed_nonce, stale_nonce,
    |            node_mismatch, bad_statement, handshake_required, handshake_refused,
    |            bad_offer, offer_expired (a job offer: refused with a job_status),
    |            not_admitted, enrolment_required (the coordinator's admission)
    +-- SequenceError             the reliable stream is broken: answer error, close
    |     codes: seq_backwards, seq_gap, ack_ahead, ack_behind
    +-- LimitExceeded             within the protocol but over a limit: answer error, go on
    |     codes: batch_too_large, log_chunk_too_large, rate_limited, quota_exceeded,
    |            frame_too_large (when encoding: the peer would refuse it),
    |            too_many_streams (opening a tunnel stream past the cap),
    |            ids_exhausted (a tunnel connection's stream ids are used up)
    +-- SessionEnded              nobody's fault, the session is over: answer error, close
    |     codes: superseded (a newer connection of the same node took over)
    +-- TunnelError               a tunnel connection's peer broke its rules: close it (the
          code as the websocket close reason); every stream on it is reset
          codes: bad_frame, unknown_frame, frame_too_large, bad_target, bad_stream_id,
                 unknown_stream, stream_closed, flow_control, window_overflow, flood
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "DecodeError",
    "LimitExceeded",
    "ProtocolError",
    "SequenceError",
    "SessionEnded",
    "TunnelError",
]


class ProtocolError(Exception):
    """Base of every protocol error; ``code`` is stable, ``detail`` is for humans."""

    #: Whether the side that detects it closes the connection after answering ``error``.
    closes: bool = False

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class DecodeError(ProtocolError):
    """A frame that is not a valid message of this protocol version."""


class AuthError(ProtocolError):
    """An identity, nonce or signature that does not hold."""

    closes = True


class SequenceError(ProtocolError):
    """A reliable stream whose sequence numbers are not what they must be."""

    closes = True


class LimitExceeded(ProtocolError):
    """A valid message over one of the protocol's limits."""


class SessionEnded(ProtocolError):
    """The session is over though the peer did nothing wrong (another one took its place)."""

    closes = True


class TunnelError(ProtocolError):
    """A tunnel connection's peer broke the tunnel's rules (docs/protocol.md, "Tunnel")."""

    closes = True
