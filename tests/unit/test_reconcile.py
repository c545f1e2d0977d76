"""The reconciler's decisions, on a clock of plain numbers: spread, share as a last resort,
re-placement after the grace, failures held back, leases renewed a third of the way in."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import pytest

from coordinator.reconcile import (
    MAX_HOLD_S,
    NODE_LOST,
    REBALANCED,
    Plan,
    Renew,
    Replica,
    Retire,
    decide,
    hold_s,
)

LEASE = 30.0
GRACE = 10.0


def plan(
    replicas: Sequence[Replica] = (),
    *,
    want: int = 2,
    eligible: Sequence[str] = ("a", "b", "c"),
    connected: Collection[str] | None = None,
    away_since: Mapping[str, float] | None = None,
    now: float = 100.0,
    failures: int = 0,
    hold_until: float = 0.0,
    failed_lately: Collection[str] = (),
) -> Plan:
    return decide(
        want=want,
        lease_s=LEASE,
        replicas=replicas,
        eligible=eligible,
        connected=set(eligible) if connected is None else connected,
        away_since=away_since or {},
        now=now,
        grace_s=GRACE,
        failures=failures,
        hold_until=hold_until,
        failed_lately=failed_lately,
    )


def running(job_id: str, node: str, state: str = "ready", until: float = 120.0) -> Replica:
    return Replica(job_id, node, state, until)


def test_replicas_spread_over_distinct_nodes() -> None:
    assert plan(want=3).place == ["a", "b", "c"]


def test_a_node_holding_a_replica_gets_none_while_another_is_free() -> None:
    assert plan([running("j1", "a")]).place == ["b"]


def test_with_one_node_left_it_takes_a_second_replica() -> None:
    assert plan(eligible=["a"]).place == ["a", "a"]
    assert plan([running("j1", "a")], eligible=["a"]).place == ["a"]


def test_no_eligible_node_places_nothing_and_keeps_what_runs() -> None:
    result = plan([running("j1", "a")], eligible=[], connected={"a"})
    assert (result.place, result.retire) == ([], [])


def test_a_replica_whose_node_is_away_is_kept_until_the_grace_then_replaced() -> None:
    replicas = [running("j1", "a"), running("j2", "b")]
    away = {"a": 95.0}
    within = plan(replicas, eligible=["b", "c"], away_since=away, now=95.0 + GRACE - 0.5)
    assert (within.retire, within.place) == ([], [])
    past = plan(replicas, eligible=["b", "c"], away_since=away, now=95.0 + GRACE)
    assert past.retire == [Retire("j1", NODE_LOST, cancel=True)]
    assert past.place == ["c"]
    assert past.failures == 0  # the node went away, not the service


def test_a_lost_replica_goes_to_the_one_node_left_when_there_is_no_other() -> None:
    replicas = [running("j1", "a"), running("j2", "b")]
    result = plan(replicas, eligible=["b"], away_since={"a": 0.0}, now=GRACE)
    assert result.retire == [Retire("j1", NODE_LOST, cancel=True)]
    assert result.place == ["b"]


@pytest.mark.parametrize("state", ["stopped", "interrupted", "error", "refused"])
def test_an_ended_replica_is_retired_and_the_next_placement_held_back(state: str) -> None:
    result = plan([running("j1", "a", state), running("j2", "b")], now=100.0)
    assert result.retire == [Retire("j1", state, cancel=False)]
    assert (result.failures, result.hold_until, result.place) == (1, 100.0 + hold_s(1), [])
    later = plan(
        [running("j2", "b")],
        now=result.hold_until,
        failures=result.failures,
        hold_until=result.hold_until,
        failed_lately={"a"},
    )
    assert later.place == ["c"]  # the node where it failed comes last among equals


def test_failures_in_a_row_double_the_hold_up_to_its_bound() -> None:
    assert [hold_s(n) for n in range(5)] == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert hold_s(10_000) == MAX_HOLD_S
    again = plan([running("j3", "a", "error")], failures=3, now=50.0)
    assert (again.failures, again.hold_until) == (4, 50.0 + 8.0)


def test_a_ready_replica_clears_the_failures() -> None:
    result = plan([running("j1", "a"), running("j2", "b")], failures=4, hold_until=99.0)
    assert result.failures == 0


def test_a_lease_is_renewed_once_a_third_of_it_has_passed() -> None:
    until = 200.0
    early = plan([running("j1", "a", until=until)], want=1, now=until - LEASE * 2 / 3 - 0.1)
    assert early.renew == []
    due = until - LEASE * 2 / 3
    result = plan([running("j1", "a", "starting", until=until)], want=1, now=due)
    assert result.renew == [Renew("j1", "a", due + LEASE)]


def test_a_replica_on_a_node_away_is_not_renewed() -> None:
    result = plan([running("j1", "a", until=100.0)], want=1, eligible=["b"], away_since={"a": 99.0})
    assert (result.renew, result.retire) == ([], [])


def test_a_node_back_gets_one_more_replica_while_another_holds_two() -> None:
    doubled = [running("j1", "a"), running("j2", "a")]
    assert plan(doubled, eligible=["a", "b"]).place == ["b"]
    starting = [running("j1", "a"), running("j2", "a", "starting")]
    assert plan(starting, eligible=["a", "b"]).place == []  # not before every one is ready


def test_the_doubled_up_replica_goes_once_the_new_one_is_ready() -> None:
    waiting = [running("j1", "a"), running("j2", "a"), running("j3", "b", "starting")]
    result = plan(waiting, eligible=["a", "b"])
    assert (result.retire, result.place) == ([], [])
    ready = [
        running("j1", "a", until=0.0),
        running("j2", "a", until=0.0),
        running("j3", "b", until=500.0),
    ]
    result = plan(ready, eligible=["a", "b"], failures=0)
    assert result.retire == [Retire("j2", REBALANCED, cancel=True)]
    assert [r.job_id for r in result.renew] == ["j1"]  # not the one retired
    assert (result.place, result.failures) == ([], 0)
