"""What a server's answer says it used, read as the answer passes (pure, bounded).

OpenAI's servers report ``usage`` (``prompt_tokens``, ``completion_tokens``): in the
body of a plain answer, and in the last event of a stream when the request asked for it
(``stream_options.include_usage``). llama.cpp's ``llama-server`` also sends ``timings``
(``prompt_n``, ``predicted_n``) in a stream's last event: used when ``usage`` is absent.

The reader keeps bounded state whatever the server sends: a plain body is kept for
parsing only up to :data:`MAX_BODY_BYTES`, a stream's line up to :data:`MAX_LINE_BYTES`
(a longer one is skipped to its end).
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

__all__ = ["MAX_BODY_BYTES", "MAX_LINE_BYTES", "Usage", "UsageReader"]

MAX_BODY_BYTES: Final = 1 << 20
MAX_LINE_BYTES: Final = 256 * 1024
#: An event that may report usage: an object under either name. The others (a token's
#: event, whose ``"usage"`` is null) are not decoded: a stream passes thousands of them.
_REPORTS: Final = re.compile(rb'"(?:usage|timings)"\s*:\s*\{')


class Usage(msgspec.Struct, frozen=True):
    """Tokens in (the prompt) and out (generated), as far as the server said."""

    tokens_in: int | None = None
    tokens_out: int | None = None


class UsageReader:
    """Fed a response body's bytes as they pass; says the usage and the first event."""

    def __init__(self, *, stream: bool) -> None:
        self._stream = stream
        self._kept = bytearray()
        self._overflow = False
        self.usage = Usage()
        self.events = 0
        """``data:`` events seen (a stream's tokens, about)."""

    def feed(self, data: bytes) -> bool:
        """Read more of the body; True when it held the stream's first event."""
        if not self._stream:
            if not self._overflow:
                self._kept += data
                if len(self._kept) > MAX_BODY_BYTES:
                    self._overflow = True
                    self._kept.clear()
            return False
        first = self.events == 0
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._line(data[start:end])
            start = end + 1
        self._partial(data[start:])
        return first and self.events > 0

    def finish(self) -> Usage:
        """The usage, once the whole body passed."""
        if not self._stream and not self._overflow and self._kept:
            self.usage = _usage(_decode(bytes(self._kept))) or self.usage
        return self.usage

    def _partial(self, piece: bytes) -> None:
        if self._overflow:
            return
        self._kept += piece
        if len(self._kept) > MAX_LINE_BYTES:
            self._overflow = True  # skipped to its end
            self._kept.clear()

    def _line(self, piece: bytes) -> None:
        if self._kept or self._overflow:  # the line began in an earlier piece
            skipped = self._overflow
            self._partial(piece)
            piece = bytes(self._kept)
            self._kept.clear()
            self._overflow = False
            if skipped:
                return
        if not piece.startswith(b"data:"):
            return
        payload = piece[5:].strip()
        if payload == b"[DONE]":
            return
        self.events += 1
        if _REPORTS.search(payload):
            self.usage = _usage(_decode(payload)) or self.usage


def _decode(data: bytes) -> Any:
    try:
        return msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):  # not JSON, or nested past msgspec's limit
        return None


def _usage(value: Any) -> Usage | None:
    if not isinstance(value, dict):
        return None
    usage = value.get("usage")
    if isinstance(usage, dict):
        found = Usage(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))
        if found != Usage():
            return found
    timings = value.get("timings")
    if isinstance(timings, dict):
        found = Usage(_count(timings.get("prompt_n")), _count(timings.get("predicted_n")))
        if found != Usage():
            return found
    return None


def _count(value: Any) -> int | None:
    # bool is an int to Python; a count it is not. Bounded to what SQLite's integers hold.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62:
        return value
    return None
