"""What all clients together may hold of the gateway (pure): connections per source, and
the bytes of request bodies read and not yet answered.

A source is a client's IPv4 address, or its IPv6 address's /64: one host is handed a
whole /64 (RFC 6177), and could open each connection from another address of it.
"""

from __future__ import annotations

import ipaddress
from typing import Any

__all__ = ["BodyBudget", "Sources", "source_of"]


def source_of(peername: Any) -> str:
    """The source a connection's peer address counts against ("" when it has none: a
    Unix socket's)."""
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return ""
    try:
        address = ipaddress.ip_address(peername[0].partition("%")[0])
    except ValueError:
        return peername[0]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Sources:
    """Connections open per source."""

    def __init__(self, per_source: int) -> None:
        self._per_source = per_source
        self._open: dict[str, int] = {}

    def admit(self, source: str) -> bool:
        """Count one more connection of ``source``; False (nothing counted) at its cap."""
        count = self._open.get(source, 0)
        if count >= self._per_source:
            return False
        self._open[source] = count + 1
        return True

    def release(self, source: str) -> None:
        """One connection of ``source`` closed."""
        count = self._open.pop(source) - 1
        if count:
            self._open[source] = count


class BodyBudget:
    """The bytes of request bodies held at once, over every connection."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes; False (nothing held) when they would pass the limit."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        """Bytes no longer held."""
        self.held -= size
