"""Which replica serves a request: least outstanding requests, ties in turn (pure).

A replica is a service job in state ``ready`` on a node whose data connection is up
(:mod:`coordinator.gateway.replicas` finds them). The router counts the requests each
replica has in flight (through the gateway), never sends one more than the spec's
``max_streams``, and picks among the replicas serving the model the one with the fewest
in flight; replicas tied at the fewest take turns (round robin, per model), so that a
quiet gateway still spreads its requests.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from enum import Enum

import msgspec

__all__ = ["Full", "Replica", "Router"]


class Replica(msgspec.Struct, frozen=True, kw_only=True):
    """One ready service job: where it runs, what it serves, how much it takes."""

    job_id: str
    node_id: str
    models: tuple[str, ...]
    max_streams: int
    via: str = ""
    """The gateway of the coordinator holding the node's tunnel (empty: this one)."""


class Full(Enum):
    """Why :meth:`Router.pick` found no replica."""

    NONE = "none"
    """No replica (not tried already) serves the model."""
    BUSY = "busy"
    """Some do, and each has ``max_streams`` requests in flight."""


class Router:
    """Requests in flight per replica, and the choice of the next one."""

    def __init__(self) -> None:
        self._outstanding: dict[str, int] = {}
        self._turns: dict[str, int] = {}

    def outstanding(self, job_id: str) -> int:
        """Requests in flight to the replica now."""
        return self._outstanding.get(job_id, 0)

    def pick(
        self, replicas: Sequence[Replica], model: str, exclude: Collection[str] = ()
    ) -> Replica | Full:
        """The replica for a request of ``model``, counted in flight (:meth:`release` it)."""
        serving = [r for r in replicas if model in r.models and r.job_id not in exclude]
        if not serving:
            return Full.NONE
        free = [r for r in serving if self.outstanding(r.job_id) < r.max_streams]
        if not free:
            return Full.BUSY
        fewest = min(self.outstanding(r.job_id) for r in free)
        tied = sorted((r for r in free if self.outstanding(r.job_id) == fewest), key=_order)
        turn = self._turns.get(model, 0)
        # One counter per model some replica serves; kept modulo a large number.
        self._turns[model] = (turn + 1) % (1 << 30)
        chosen = tied[turn % len(tied)]
        self._outstanding[chosen.job_id] = fewest + 1
        return chosen

    def release(self, job_id: str) -> None:
        """A request to the replica ended (answered, failed or cancelled)."""
        left = self._outstanding.get(job_id, 0) - 1
        if left > 0:
            self._outstanding[job_id] = left
        else:
            self._outstanding.pop(job_id, None)


def _order(replica: Replica) -> tuple[str, str]:
    return (replica.node_id, replica.job_id)
