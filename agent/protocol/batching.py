"""Bodies split to fit the protocol's limits, measured on their real encoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from agent.protocol.bodies import TelemetryBody
from agent.protocol.limits import MAX_FRAME_BYTES, MAX_TELEMETRY_BATCH
from agent.protocol.messages import reliable_overhead

__all__ = ["telemetry_bodies"]

#: The most body bytes a telemetry frame holds, whatever seq the outbox gives it.
_TELEMETRY_ROOM = MAX_FRAME_BYTES - reliable_overhead("telemetry")


def telemetry_bodies(samples: Sequence[dict[str, Any]]) -> list[bytes]:
    """Encoded ``telemetry`` bodies for ``samples``, in order, each one frame's worth.

    A body holds at most ``MAX_TELEMETRY_BATCH`` samples, and its frame fits
    ``MAX_FRAME_BYTES`` with any seq; one sample too large for a frame alone stays one
    body (encoding its frame then refuses it as ``frame_too_large``).
    """
    if len(samples) <= MAX_TELEMETRY_BATCH:
        body = msgspec.json.encode(TelemetryBody(samples=list(samples)))
        if len(body) <= _TELEMETRY_ROOM or len(samples) == 1:
            return [body]
    half = len(samples) // 2
    return telemetry_bodies(samples[:half]) + telemetry_bodies(samples[half:])
