"""A body's pieces, bounded by its bytes (pure): the work per byte a peer can cause.

h11 makes one event of every chunk of a chunked body (and one more of a chunk split
between two reads), and each event costs the loop microseconds (the parse, the usage
reader, the write on) whatever its size: 1-byte chunks cost ~100 times the CPU of the
same bytes in one chunk, and a client would get 6 bytes of framing for each. So a body
may come in at most :data:`FREE_PIECES` pieces, plus one per :data:`MIN_PIECE_BYTES` of
it; one in more is refused as it comes, not after its end.

The numbers: an honest token stream's event is one chunk of 150 bytes or more (OpenAI's
and llama.cpp's ``chat.completion.chunk`` carry an id, a model, a timestamp), two pieces
when a read splits it: 75 bytes a piece, over twice :data:`MIN_PIECE_BYTES`. A hostile
peer is then held to the work of an honest stream of 32-byte tokens: for the 1 GiB answer
cap, 32 million pieces at most, and for an 8 MiB request body, 263,000 (not 8 million).
"""

from __future__ import annotations

from typing import Final

__all__ = ["FREE_PIECES", "MIN_PIECE_BYTES", "Pieces"]

#: Pieces any body may come in: a short body's few, whatever their sizes.
FREE_PIECES: Final = 1024
#: Bytes of a body that earn it one more piece.
MIN_PIECE_BYTES: Final = 32


class Pieces:
    """The pieces of one body, counted as they come."""

    def __init__(self) -> None:
        self.count = 0
        self.size = 0

    def add(self, size: int) -> bool:
        """Count a piece of ``size`` bytes; False once the pieces are more than the bytes
        justify."""
        self.count += 1
        self.size += size
        return self.count <= FREE_PIECES + self.size // MIN_PIECE_BYTES

    def refusal(self) -> str:
        """Why the body is refused, for the error's detail."""
        return f"{self.count} pieces for {self.size} bytes"
