"""A test agent's identity, and a clock a test moves forward."""

from __future__ import annotations

import time

from agent.protocol import crypto

__all__ = ["Clock", "Node"]


class Clock:
    """Wall time plus an offset a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Node:
    """A test agent's identity."""

    def __init__(self) -> None:
        self.key = crypto.generate_private_key()
        self.public_key = crypto.public_key_bytes(self.key)
        self.node_id = crypto.node_id(self.public_key)
        self.key_id = crypto.key_id(self.public_key)
        self.last_coordinator_seq = 0
        """The last seq of the coordinator's stream this agent stored (and acknowledged)."""
