"""How much of a job's output is kept, and how fast it is read at all.

Two bounds. :class:`LogBudget` caps what is kept and forwarded (a total, and a rate
with a burst), digesting what it keeps. :class:`Drain` caps how fast the output is read
from the engine at all: the engine copies a job's output outside the job's cgroup (its
shim, dockerd), so this is what the host spends on it. Read no faster, the pipe fills and
the job's own writes wait; the job is throttled, not the host.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

__all__ = ["Drain", "LogBudget"]


class LogBudget:
    """Caps a job's log in total size and in rate (a token bucket), and digests what passes."""

    def __init__(
        self, max_bytes: int, rate: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self.rate = rate
        self.clock = clock
        self.tokens = float(rate)
        self.last = clock()
        self.kept = 0
        self.dropped = 0
        self.truncated = False
        self.digest = hashlib.sha256()

    @property
    def full(self) -> bool:
        """Whether the size cap is reached: nothing more will be kept."""
        return self.kept >= self.max_bytes

    def admit(self, data: bytes) -> bytes:
        """The part of ``data`` that fits the budget now; the rest is counted as dropped."""
        now = self.clock()
        self.tokens = min(float(self.rate), self.tokens + (now - self.last) * self.rate)
        self.last = now
        allowed = int(min(len(data), self.tokens, self.max_bytes - self.kept))
        allowed = max(allowed, 0)
        self.tokens -= allowed
        self.kept += allowed
        self.dropped += len(data) - allowed
        self.truncated = self.truncated or (self.full and allowed < len(data))
        self.digest.update(data[:allowed])
        return data[:allowed]


class Drain:
    """Paces reading to ``rate`` bytes a second, with a burst of as much (a token bucket)."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = float(rate)
        self.last = clock()

    def delay(self, size: int) -> float:
        """Seconds to wait, after reading ``size`` bytes, before reading more."""
        now = self.clock()
        self.tokens = min(float(self.rate), self.tokens + (now - self.last) * self.rate) - size
        self.last = now
        return max(0.0, -self.tokens / self.rate)
