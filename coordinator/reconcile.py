"""What a deployment needs now, sans I/O: which replicas to retire, where to place new ones,
which leases to renew. :mod:`coordinator.deployments` reads the store and the open sessions
into :func:`decide`'s arguments, then carries its :class:`Plan` out.

A replica is a service job (docs/services.md) of the deployment on one node. It is
**live** until it is retired; it is retired when

- its job ended (``stopped`` for any reason, ``interrupted``, ``error``, ``refused``...):
  a **failure**, which holds back the next placement (doubling, up to
  :data:`MAX_HOLD_S`; a replica seen ``ready`` clears the count);
- its node has been disconnected for ``grace_s`` or longer: ``node_lost``, not a
  failure (the node, not the service, went away). Its job is cancelled: the cancel waits
  in the node's stream and stops the service if the node comes back.

Placement spreads: a new replica goes to the eligible node with the fewest live replicas
of the deployment, so no node holds two while another holds none. When every eligible node
already holds one, a node takes a second: the deployment keeps its capacity (a node of two
GPUs serves two replicas; one that cannot refuses the offer, a failure held back as any
other) rather than wait, perhaps for ever, for another node. A node where a replica of the
deployment failed lately comes last among equals. When a node holds two while an eligible
node holds none, and every replica is ready, one more replica goes to the free node, and
once it is ready a replica of the doubled node is retired (``rebalanced``): the spread
comes back without the deployment ever running short.

Leases: a live replica on a connected node is renewed once a third of its lease has passed
since the last renewal (its placement at first), to one lease from now, so that a late
renewal or a clock ahead by up to two thirds of a lease still keeps it running. A node
away keeps nothing renewed: its services stop at their lease if it never comes back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from agent.protocol.jobs import FINAL_STATES

__all__ = [
    "BASE_HOLD_S",
    "MAX_HOLD_S",
    "NODE_LOST",
    "REBALANCED",
    "Plan",
    "Renew",
    "Replica",
    "Retire",
    "decide",
    "hold_s",
]

#: The hold after a deployment's first failure, in seconds; doubled at each one after.
BASE_HOLD_S: Final = 1.0
#: The longest hold between placements after failures, in seconds.
MAX_HOLD_S: Final = 300.0
#: The code of a replica retired because its node stayed away past the grace.
NODE_LOST: Final = "node_lost"
#: The code of a replica retired because the spread was restored without it.
REBALANCED: Final = "rebalanced"


@dataclass(frozen=True)
class Replica:
    """A live replica: its job, node, job state (``""``: not reported yet), when it was
    placed and until when its lease was last renewed (by the coordinator's clock)."""

    job_id: str
    node_id: str
    state: str
    renewed_until: float


@dataclass(frozen=True)
class Retire:
    """Retire a replica with ``code``; ``cancel``: its job may still run, stop it."""

    job_id: str
    code: str
    cancel: bool


@dataclass(frozen=True)
class Renew:
    """Renew a replica's lease until ``until`` (``service_renew``)."""

    job_id: str
    node_id: str
    until: float


@dataclass
class Plan:
    """What to do for one deployment, and its failure count and hold after."""

    retire: list[Retire] = field(default_factory=list)
    place: list[str] = field(default_factory=list)
    """The node of each new replica (a node may come twice)."""
    renew: list[Renew] = field(default_factory=list)
    failures: int = 0
    hold_until: float = 0.0


def hold_s(failures: int) -> float:
    """How long placements wait after ``failures`` failures in a row."""
    if failures <= 0:
        return 0.0
    return min(BASE_HOLD_S * 2.0 ** min(failures - 1, 32), MAX_HOLD_S)


def decide(
    *,
    want: int,
    lease_s: float,
    replicas: Sequence[Replica],
    eligible: Sequence[str],
    connected: Collection[str],
    away_since: Mapping[str, float],
    now: float,
    grace_s: float,
    failures: int = 0,
    hold_until: float = 0.0,
    failed_lately: Collection[str] = (),
) -> Plan:
    """The plan that brings a deployment of ``want`` replicas toward it.

    Args:
        replicas: its live replicas.
        eligible: the nodes a replica may be placed on now (connected and available).
        connected: the nodes with an open session.
        away_since: when each node not connected was first seen away.
        failures, hold_until: the deployment's count of failures in a row, and until when
            its placements are held back.
        failed_lately: nodes where a replica of it failed lately: placed on last.
    """
    plan = Plan(failures=failures, hold_until=hold_until)
    kept: list[Replica] = []
    failed_on = set(failed_lately)
    for replica in replicas:
        if replica.state in FINAL_STATES:
            plan.retire.append(Retire(replica.job_id, replica.state, cancel=False))
            failed_on.add(replica.node_id)
            continue
        away = replica.node_id not in connected
        if away and now - away_since.get(replica.node_id, now) >= grace_s:
            plan.retire.append(Retire(replica.job_id, NODE_LOST, cancel=True))
            continue
        kept.append(replica)
        if replica.state == "ready":
            plan.failures = 0
        if not away and now >= replica.renewed_until - lease_s * 2 / 3:
            plan.renew.append(Renew(replica.job_id, replica.node_id, now + lease_s))
    if (ended := sum(1 for r in plan.retire if not r.cancel)) > 0:
        plan.failures += ended
        plan.hold_until = now + hold_s(plan.failures)
    if now < plan.hold_until:
        return plan
    held = Counter(r.node_id for r in kept)
    _trim(plan, kept, held, want)
    if now < plan.hold_until:
        return plan
    missing = want - len(kept)
    if missing <= 0 and _spread_restorable(kept, held, eligible, connected):
        missing = 1  # one more on the free node; the doubled-up one goes once it is ready
    for _ in range(max(0, missing)):
        if not eligible:
            break
        node = min(eligible, key=lambda n: (held[n], n in failed_on, n))
        held[node] += 1
        plan.place.append(node)
    return plan


def _trim(plan: Plan, kept: list[Replica], held: Counter[str], want: int) -> None:
    """Retire the replicas past ``want`` from the nodes holding the most (one not ready
    first, else the newest), once as many as wanted are ready without them."""
    while len(kept) > want:
        node = max(held, key=lambda n: (held[n], n))
        on_node = [r for r in reversed(kept) if r.node_id == node]
        victim = next((r for r in on_node if r.state != "ready"), on_node[0])
        if sum(1 for r in kept if r.state == "ready" and r is not victim) < want:
            return
        kept.remove(victim)
        held[node] -= 1
        plan.retire.append(Retire(victim.job_id, REBALANCED, cancel=True))
        plan.renew = [r for r in plan.renew if r.job_id != victim.job_id]


def _spread_restorable(
    kept: Sequence[Replica], held: Counter[str], eligible: Sequence[str], connected: Collection[str]
) -> bool:
    """Whether a node holds two replicas while an eligible one holds none, and every
    replica is ready on a connected node (nothing else to wait for first)."""
    return (
        all(r.state == "ready" and r.node_id in connected for r in kept)
        and any(count >= 2 for count in held.values())
        and any(held[n] == 0 for n in eligible)
    )
