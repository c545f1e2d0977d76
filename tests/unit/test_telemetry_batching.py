"""Telemetry split into bodies by the protocol's limits, measured on the real encoding."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from agent.daemon.sampler import telemetry_bodies
from agent.protocol import batching
from agent.protocol.limits import MAX_FRAME_BYTES, MAX_SEQ, MAX_TELEMETRY_BATCH
from agent.protocol.messages import Telemetry, decode_frame, encode_reliable, reliable_overhead
from hal.types import UNSUPPORTED, HostSample, Sample


def sample(n: int) -> Sample:
    host = HostSample(
        cpu_pct=1.0,
        load_1m=0.5,
        memory_used_bytes=n,
        memory_available_bytes=1,
        net_rx_bytes=0,
        net_tx_bytes=0,
        disk_read_bytes=UNSUPPORTED,
        disk_write_bytes=UNSUPPORTED,
    )
    return Sample(taken_at=float(n), host=host, gpus=[])


def padded(total: int) -> list[dict[str, Any]]:
    """Two samples whose telemetry body is exactly ``total`` bytes."""
    empty = len(
        json.dumps({"samples": [{"p": ""}, {"p": ""}], "dropped": 0}, separators=(",", ":"))
    )
    pad = total - empty
    return [{"p": "x" * (pad // 2)}, {"p": "x" * (pad - pad // 2)}]


def test_more_samples_than_a_batch_holds_are_split_into_batches_the_peer_takes() -> None:
    # A full disk keeps a batch's samples for the next one: the next batch is larger.
    samples = [sample(n) for n in range(MAX_TELEMETRY_BATCH + 1)]
    bodies = telemetry_bodies(samples)
    frames = [decode_frame(encode_reliable("telemetry", MAX_SEQ, body)) for body in bodies]
    assert all(isinstance(f, Telemetry) for f in frames)
    kept = [s for f in frames if isinstance(f, Telemetry) for s in f.body.samples]
    assert [msgspec.json.decode(s["taken_at"]) for s in kept] == [
        float(n) for n in range(MAX_TELEMETRY_BATCH + 1)
    ]


def test_a_body_whose_frame_just_fits_is_not_split() -> None:
    room = MAX_FRAME_BYTES - reliable_overhead("telemetry")
    (body,) = batching.telemetry_bodies(padded(room))
    assert len(body) == room
    assert len(encode_reliable("telemetry", MAX_SEQ, body).encode()) == MAX_FRAME_BYTES


def test_a_body_one_byte_over_is_split_and_every_frame_fits() -> None:
    room = MAX_FRAME_BYTES - reliable_overhead("telemetry")
    bodies = batching.telemetry_bodies(padded(room + 1))
    assert len(bodies) == 2
    for body in bodies:
        assert len(encode_reliable("telemetry", MAX_SEQ, body).encode()) <= MAX_FRAME_BYTES
