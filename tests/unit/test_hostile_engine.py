"""Holes a hostile job opens in the engine around it, closed: each found on the real engine.

These tests need nothing outside this process; the others are in
tests/integration/test_hostile_engine.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.container import volume_paths
from sandbox.errors import RunError
from sandbox.joblog import Drain
from sandbox.uids import UidPool


def test_image_volumes_are_matched_as_docker_cleans_them_and_odd_ones_refused() -> None:
    assert volume_paths(["/data/", "//dbl", "/a/../b", "/data"]) == ["/b", "/data", "/dbl"]
    for declared in ("relative", "/", "/proc/x", "//sys", "/dev/shm", "/../dev"):
        with pytest.raises(RunError) as refused:
            volume_paths([declared])
        assert refused.value.code == "bad_image_volume"


def test_drain_paces_reading_to_its_rate_after_a_burst() -> None:
    now = [0.0]
    drain = Drain(rate=100, clock=lambda: now[0])
    assert drain.delay(100) == 0.0  # the burst
    assert drain.delay(50) == 0.5  # then half a second per 50 bytes
    now[0] = 0.5
    assert drain.delay(50) == 0.5
    now[0] = 100.0
    assert drain.delay(150) == 0.5  # a long pause refills one burst, no more


def test_uid_pool_gives_each_live_job_its_own_and_says_when_none_is_free(
    tmp_path: Path,
) -> None:
    pool = UidPool(base=1000, count=2, lock_dir=tmp_path)
    assert (pool.take(), pool.take()) == (1000, 1001)
    with pytest.raises(RunError) as refused:
        pool.take()
    assert refused.value.code == "no_free_uid"
    pool.release(1000)
    assert pool.take() == 1000


def test_two_runners_on_one_host_never_hand_out_the_same_uid(tmp_path: Path) -> None:
    # The daemon and a run-local beside it: two pools, one host-wide lock directory.
    daemon, local = UidPool(1000, 3, tmp_path), UidPool(1000, 3, tmp_path)
    assert (daemon.take(), local.take(), daemon.take()) == (1000, 1001, 1002)
    with pytest.raises(RunError):
        local.take()
    local.release(1001)
    assert daemon.take() == 1001
