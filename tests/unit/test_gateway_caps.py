"""The gateway's shares of itself (pure): sources, bodies held, a body's pieces."""

from __future__ import annotations

from coordinator.gateway.caps import BodyBudget, Sources, source_of
from coordinator.gateway.pieces import FREE_PIECES, MIN_PIECE_BYTES, Pieces


def test_a_source_is_an_ipv4_address_or_an_ipv6_64() -> None:
    assert source_of(("192.0.2.7", 5000)) == "192.0.2.7"
    assert source_of(("::ffff:192.0.2.7", 5000, 0, 0)) == "192.0.2.7"
    # One host's /64 is one source, whichever of its addresses a connection comes from.
    a = source_of(("2001:db8:1:2::1", 5000, 0, 0))
    b = source_of(("2001:db8:1:2:ffff:ffff:ffff:ffff", 5001, 0, 0))
    assert a == b == "2001:db8:1:2::/64"
    assert source_of(("2001:db8:1:3::1", 5000, 0, 0)) != a
    assert source_of(("fe80::1%eth0", 5000, 0, 2)) == "fe80::/64"
    assert source_of(None) == source_of("") == ""


def test_a_source_past_its_share_is_refused_until_one_of_its_own_closes() -> None:
    sources = Sources(2)
    assert sources.admit("a")
    assert sources.admit("a")
    assert not sources.admit("a")
    assert sources.admit("b")
    sources.release("a")
    assert sources.admit("a")


def test_bodies_held_are_bounded_over_all_and_given_back() -> None:
    budget = BodyBudget(100)
    assert budget.take(60)
    assert not budget.take(41)
    assert budget.held == 60
    budget.give_back(60)
    assert budget.take(100)


def test_a_body_may_come_in_many_pieces_only_when_they_are_large_enough() -> None:
    tiny = Pieces()
    passed = sum(1 for _ in iter(lambda: tiny.add(1), False))  # until one is refused
    assert FREE_PIECES <= passed <= FREE_PIECES + FREE_PIECES // (MIN_PIECE_BYTES - 1)
    tokens = Pieces()  # a token stream's events, each a chunk of MIN_PIECE_BYTES or more
    assert all(tokens.add(MIN_PIECE_BYTES) for _ in range(100 * FREE_PIECES))
