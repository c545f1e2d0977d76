"""The agents' endpoint compresses large messages and sends small ones (acks) as they are."""

from __future__ import annotations

from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

from coordinator.compression import MIN_COMPRESSED_BYTES, SmallUncompressed


def pair() -> tuple[SmallUncompressed, PerMessageDeflate]:
    """The coordinator's side and the agent's, with context takeover as negotiated."""
    return SmallUncompressed(False, False, 12, 12, {"memLevel": 5}), PerMessageDeflate(
        False, False, 12, 12
    )


def test_a_small_message_goes_uncompressed_and_a_large_one_compressed() -> None:
    ours, theirs = pair()
    ack = b'{"v":1,"type":"ack","body":{"seq":7}}'
    sent = ours.encode(Frame(Opcode.TEXT, ack))
    assert not sent.rsv1
    assert sent.data == ack
    assert theirs.decode(sent).data == ack
    offer = b'{"pad":"' + b"x" * (2 * MIN_COMPRESSED_BYTES) + b'"}'
    sent = ours.encode(Frame(Opcode.TEXT, offer))
    assert sent.rsv1
    assert len(sent.data) < len(offer)
    assert theirs.decode(sent).data == offer


def test_compressed_messages_stay_in_step_around_uncompressed_ones() -> None:
    ours, theirs = pair()
    for n in range(20):
        data = (b"%d:" % n) + (b"abc" * (n * 100 if n % 2 else 5))
        assert theirs.decode(ours.encode(Frame(Opcode.TEXT, data))).data == data
