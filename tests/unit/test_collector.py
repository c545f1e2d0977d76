"""The coordinator's collector policy: long-lived objects frozen, frozen garbage swept."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from coordinator import collector


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test session collects as usual


def test_a_sweep_frees_cyclic_garbage_that_was_frozen() -> None:
    node = _Node()
    alive = weakref.ref(node)
    gc.freeze()
    del node
    gc.collect()
    assert alive() is not None  # frozen: out of the collector's sight
    assert collector.sweep() >= 1
    assert alive() is None
    assert gc.get_freeze_count() > 0  # what survived is frozen again


async def test_keep_frozen_freezes_at_once_and_sweeps_what_it_froze() -> None:
    gc.unfreeze()
    node = _Node()
    alive = weakref.ref(node)
    task = asyncio.create_task(collector.keep_frozen(freeze_every_s=0.01, sweep_every_s=0.05))
    await asyncio.sleep(0)  # it starts: its first freeze comes before any wait
    assert gc.get_freeze_count() > 0
    del node
    gc.collect()
    assert alive() is not None  # frozen with the rest: only a sweep frees it
    async with asyncio.timeout(10):
        while alive() is not None:
            await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_burst_of_sessions_is_frozen_before_the_period_is_over() -> None:
    # After a restart every agent reconnects at once: their sessions are frozen as they
    # come, not FREEZE_EVERY_S later, so that full collections do not walk them meanwhile.
    task = asyncio.create_task(
        collector.keep_frozen(freeze_every_s=3600, after_opened=3, poll_s=0.01)
    )
    await asyncio.sleep(0)
    sessions = [_Node() for _ in range(1000)]
    # Frozen: counted by the freeze count (give or take what was frozen and freed since).
    frozen = gc.get_freeze_count() + len(sessions) // 2
    for _ in range(2):
        collector.opened()
    await asyncio.sleep(0.05)
    assert gc.get_freeze_count() < frozen  # two opened: not due yet
    collector.opened()
    async with asyncio.timeout(10):
        while gc.get_freeze_count() < frozen:
            await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
