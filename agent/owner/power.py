"""The owner's power limit: held on the GPUs while they are shared, lifted otherwise.

With ``owner.power_limit_w`` set, each physical GPU is held to that limit while the node
shares (no guard tripped, not paused), and given back the limit it had when the agent
started as soon as it does not: the owner games at full power. Where the driver or the
agent's rights do not allow it, the HAL says so (``unsupported``, ``permission_denied``,
``out_of_range``) and nothing else changes. Called from the sampler thread, which owns
the HAL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from hal.machine import Hal
from hal.types import GpuProfile, PowerLimitResult, is_value

__all__ = ["PowerLimiter"]

_log = logging.getLogger(__name__)


class PowerLimiter:
    """Applies a power limit to every physical GPU, and restores their own."""

    def __init__(self, gpus: Iterable[GpuProfile]) -> None:
        self.original = {
            g.id: float(g.power_limit_w)
            for g in gpus
            if g.kind != "mig" and is_value(g.power_limit_w)
        }
        self.applied: float | None = None
        """The limit in force by our hand; None: each GPU's own."""
        self.results: dict[str, PowerLimitResult] = {}

    def apply(self, hal: Hal, wanted: float | None) -> bool:
        """Hold every GPU to ``wanted`` watts (None: their own limits); whether anything
        was asked of the HAL."""
        if wanted == self.applied:
            return False
        for gpu_id, own in self.original.items():
            result = hal.set_power_limit(gpu_id, own if wanted is None else wanted)
            self.results[gpu_id] = result
            if result.status != "set":
                _log.warning("power limit of GPU %s: %s %s", gpu_id, result.status, result.detail)
        self.applied = wanted
        return True

    def describe(self, gpu_id: str) -> str:
        """What the last attempt on one GPU came to, for ``gpu-agent status``."""
        result = self.results.get(gpu_id)
        if result is None:
            return ""
        if result.status == "set":
            return f"set: {result.limit_w:.0f} W" if result.limit_w is not None else "set"
        return f"{result.status}: {result.detail}" if result.detail else result.status
