"""``gpu-agent run`` against the reference coordinator, both real processes on 127.0.0.1.

Kill either side with SIGKILL mid-stream, restart it, and the coordinator's store still
ends with every seq exactly once, with no gaps.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.processes import (
    DUAL_A5000,
    Agent,
    Coordinator,
    assert_exactly_once_no_gaps,
    shutdown,
    wait_for,
)

from agent.protocol import crypto


@pytest.fixture
def pair(
    tmp_path: Path, library_for: Callable[[Path], Path]
) -> Iterator[tuple[Coordinator, Agent]]:
    coordinator = Coordinator(tmp_path)
    coordinator.start()
    agent = Agent(tmp_path, library_for(DUAL_A5000), coordinator, coordinator.public_key())
    yield coordinator, agent
    shutdown(coordinator, agent)


def test_agent_attests_its_gpus_and_streams_until_sigterm(
    pair: tuple[Coordinator, Agent],
) -> None:
    coordinator, agent = pair
    agent.start()
    wait_for(lambda: len(coordinator.seqs()) >= 6, "six messages")
    assert agent.stop() == 0
    seqs = coordinator.seqs()
    assert_exactly_once_no_gaps(seqs)
    # The profile answers the coordinator's attest_request, which is stored (an fsync)
    # before it is sent: a node_status or a telemetry batch may be in the outbox before it.
    assert "profile" in [kind for _, kind in seqs]
    with sqlite3.connect(coordinator.db) as db:
        verified = db.execute("SELECT COUNT(*) FROM messages WHERE type = 'profile'").fetchone()
    db.close()
    assert verified[0] >= 1


def _restart_mid_stream(
    coordinator: Coordinator, agent: Agent, restart: Callable[[], None]
) -> None:
    """Three times: let messages flow, then restart one side; end with every seq once."""
    agent.start()
    for round_ in range(3):
        wait_for(lambda r=round_: len(coordinator.seqs()) >= 4 * (r + 1), "more messages")  # type: ignore[misc]
        restart()
    before = len(coordinator.seqs())
    wait_for(lambda: len(coordinator.seqs()) > before + 2, "delivery after the last restart")
    assert agent.stop() == 0
    assert_exactly_once_no_gaps(coordinator.seqs())


def test_coordinator_killed_and_restarted_mid_stream_loses_and_repeats_nothing(
    pair: tuple[Coordinator, Agent],
) -> None:
    coordinator, agent = pair

    def restart() -> None:
        coordinator.kill()
        time.sleep(0.3)  # the agent keeps sampling into its outbox while it is gone
        coordinator.start()

    _restart_mid_stream(coordinator, agent, restart)


def test_agent_killed_and_restarted_mid_stream_loses_and_repeats_nothing(
    pair: tuple[Coordinator, Agent],
) -> None:
    coordinator, agent = pair

    def restart() -> None:
        agent.kill()
        agent.start()

    _restart_mid_stream(coordinator, agent, restart)


def test_a_restarted_coordinator_does_not_ask_the_daemon_to_attest_its_unchanged_profile_again(
    pair: tuple[Coordinator, Agent],
) -> None:
    # The daemon's hello names the digest of the profile it attests; the coordinator holds
    # that profile, verified within the hour: the reconnect costs no new attestation.
    coordinator, agent = pair
    agent.start()
    wait_for(lambda: "profile" in [kind for _, kind in coordinator.seqs()], "the profile")
    coordinator.kill()
    before = len(coordinator.seqs())
    coordinator.start()
    wait_for(lambda: len(coordinator.seqs()) > before + 2, "delivery after the restart")
    assert agent.stop() == 0
    seqs = coordinator.seqs()
    assert_exactly_once_no_gaps(seqs)
    assert [kind for _, kind in seqs].count("profile") == 1
    with sqlite3.connect(coordinator.db) as db:
        asked = db.execute("SELECT COUNT(*) FROM attest_nonces").fetchone()
    db.close()
    assert asked[0] == 1


def test_agent_refuses_a_coordinator_that_cannot_prove_the_pinned_key(
    tmp_path: Path, library_for: Callable[[Path], Path]
) -> None:
    coordinator = Coordinator(tmp_path)
    coordinator.start()
    impostor_key = crypto.b64encode(crypto.public_key_bytes(crypto.generate_private_key()))
    agent = Agent(tmp_path, library_for(DUAL_A5000), coordinator, impostor_key)
    agent.start()
    try:
        wait_for(lambda: b"untrusted_key" in agent.log.read_bytes(), "the refusal")
        assert coordinator.seqs() == []
        assert agent.stop() == 0
    finally:
        coordinator.kill()
