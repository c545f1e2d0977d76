"""Client keys' rate limits and the bearer token of a request (pure).

Each key has a token bucket of ``rate_per_min`` requests a minute: full, it holds a
minute's worth (a client may spend it at once), and it refills at the rate. A request
over it is refused ``rate_limited`` with the seconds until the next one would pass
(``Retry-After``). The buckets live in memory (a restart forgives); one is kept per key
that used the gateway lately: a bucket that refilled to full is the same as none, and is
dropped when the table grows.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["MAX_BUCKETS", "RateLimits", "bearer", "retry_after"]

#: Buckets kept before the full ones are dropped.
MAX_BUCKETS: Final = 10_000
_MAX_KEY_CHARS: Final = 512


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when it is not one."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > _MAX_KEY_CHARS:
        return None
    return token


class _Bucket:
    """A minute's worth of requests, refilled at ``rate_per_min``."""

    def __init__(self, rate_per_min: int, now: float) -> None:
        self.rate_per_min = rate_per_min
        self._tokens = float(rate_per_min)
        self._at = now

    def take(self, now: float) -> float:
        """Take one token: 0.0; or, with none there, the seconds until one is (none taken)."""
        rate = self.rate_per_min / 60.0
        self._tokens = min(float(self.rate_per_min), self._tokens + max(now - self._at, 0.0) * rate)
        self._at = max(now, self._at)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / rate

    def empty(self, now: float) -> bool:
        """Whether :meth:`take` would refuse now (nothing taken)."""
        refilled = self._tokens + max(now - self._at, 0.0) * self.rate_per_min / 60.0
        return refilled < 1.0

    def full(self, now: float) -> bool:
        return (
            self._tokens + max(now - self._at, 0.0) * self.rate_per_min / 60.0 >= self.rate_per_min
        )


class RateLimits:
    """One token bucket per key id."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def admit(self, key_id: str, rate_per_min: int, now: float) -> float:
        """Take one request of the key's; 0.0, or the seconds to wait (nothing taken)."""
        bucket = self._buckets.get(key_id)
        if bucket is None or bucket.rate_per_min != rate_per_min:
            if len(self._buckets) >= MAX_BUCKETS:
                self._drop_full(now)
            bucket = _Bucket(rate_per_min, now)
            self._buckets[key_id] = bucket
        return bucket.take(now)

    def spent(self, key_id: str, now: float) -> bool:
        """Whether ``key_id``'s bucket holds no request now (nothing taken)."""
        bucket = self._buckets.get(key_id)
        return bucket is not None and bucket.empty(now)

    def _drop_full(self, now: float) -> None:
        for key_id in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[key_id]


def retry_after(wait_s: float) -> str:
    """``Retry-After``'s value: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))
