"""The content-addressed input cache: whole entries only, a budget, LRU, shared fetches."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent.errors import InputError
from agent.inputs.cache import InputCache


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _writer(data: bytes, calls: list[str]) -> Callable[[int], Awaitable[None]]:
    async def fill(fd: int) -> None:
        calls.append(_digest(data))
        os.write(fd, data)

    return fill


def _cache(tmp_path: Path, max_bytes: int) -> InputCache:
    cache = InputCache(tmp_path / "inputs", max_bytes)
    cache.open()
    return cache


async def _put(cache: InputCache, data: bytes, calls: list[str]) -> None:
    async with cache.use(_digest(data), len(data), _writer(data, calls)):
        pass


async def test_an_entry_is_read_only_and_named_by_its_digest(tmp_path: Path) -> None:
    cache, calls = _cache(tmp_path, 100), list[str]()
    async with cache.use(_digest(b"abc"), 3, _writer(b"abc", calls)) as path:
        assert path == tmp_path / "inputs" / "sha256" / _digest(b"abc")
        assert path.read_bytes() == b"abc"
        assert path.stat().st_mode & 0o777 == 0o444
    assert list((tmp_path / "inputs" / "tmp").iterdir()) == []


async def test_an_entry_is_fetched_once_for_many_jobs(tmp_path: Path) -> None:
    cache, calls = _cache(tmp_path, 100), list[str]()
    await _put(cache, b"abc", calls)
    await _put(cache, b"abc", calls)
    assert calls == [_digest(b"abc")]


async def test_two_jobs_asking_at_once_share_one_fetch(tmp_path: Path) -> None:
    cache, calls = _cache(tmp_path, 100), list[str]()
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(fd: int) -> None:
        calls.append("fetch")
        started.set()
        await release.wait()
        os.write(fd, b"abc")

    async def job() -> bytes:
        async with cache.use(_digest(b"abc"), 3, slow) as path:
            return path.read_bytes()

    first = asyncio.create_task(job())
    await started.wait()  # the first is fetching
    second = asyncio.create_task(job())
    await asyncio.sleep(0)  # one loop turn: the second runs up to where it waits
    release.set()
    jobs = [first, second]
    assert await asyncio.gather(*jobs) == [b"abc", b"abc"]
    assert calls == ["fetch"]


async def test_the_least_recently_used_entry_is_evicted_to_fit(tmp_path: Path) -> None:
    cache, calls = _cache(tmp_path, 10), list[str]()
    a, b, c = b"a" * 4, b"b" * 4, b"c" * 4
    await _put(cache, a, calls)
    await _put(cache, b, calls)
    await _put(cache, a, calls)  # a is now more recent than b
    await _put(cache, c, calls)
    assert cache.holds(_digest(a))
    assert cache.holds(_digest(c))
    assert not cache.holds(_digest(b))
    assert not cache.path_of(_digest(b)).exists()
    assert cache.used_bytes == 8


async def test_an_entry_in_use_is_not_evicted(tmp_path: Path) -> None:
    cache, calls = _cache(tmp_path, 10), list[str]()
    a, b = b"a" * 6, b"b" * 6
    async with cache.use(_digest(a), 6, _writer(a, calls)) as held:
        with pytest.raises(InputError) as caught:
            await _put(cache, b, calls)
        assert caught.value.code == "input_cache_full"
        assert held.read_bytes() == a
    await _put(cache, b, calls)  # once released, a makes room
    assert not cache.holds(_digest(a))


async def test_an_input_larger_than_the_budget_is_refused_unfetched(tmp_path: Path) -> None:
    cache, calls = _cache(tmp_path, 10), list[str]()
    with pytest.raises(InputError) as caught:
        await _put(cache, b"x" * 11, calls)
    assert caught.value.code == "input_cache_full"
    assert calls == []


async def test_a_failed_fetch_leaves_no_entry_and_no_temp_file(tmp_path: Path) -> None:
    cache = _cache(tmp_path, 100)

    async def half_then_fail(fd: int) -> None:
        os.write(fd, b"ab")
        raise InputError("input_digest_mismatch", "test")

    with pytest.raises(InputError):
        async with cache.use(_digest(b"abc"), 3, half_then_fail):
            pass
    assert not cache.holds(_digest(b"abc"))
    assert not cache.path_of(_digest(b"abc")).exists()
    assert list((tmp_path / "inputs" / "tmp").iterdir()) == []
    assert cache.used_bytes == 0


async def test_a_partial_file_a_killed_agent_left_is_removed_not_used(tmp_path: Path) -> None:
    digest = _digest(b"abc")
    partial = tmp_path / "inputs" / "tmp" / f"{digest}.0badf00d"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"ab")
    cache, calls = _cache(tmp_path, 100), list[str]()
    assert not partial.exists()
    assert not cache.holds(digest)
    await _put(cache, b"abc", calls)
    assert calls == [digest]


async def test_entries_and_their_order_survive_a_restart(tmp_path: Path) -> None:
    cache, calls = _cache(tmp_path, 10), list[str]()
    a, b = b"a" * 4, b"b" * 4
    await _put(cache, a, calls)
    await _put(cache, b, calls)
    os.utime(cache.path_of(_digest(a)), ns=(1, 1))  # a: long unused
    again = _cache(tmp_path, 10)
    assert again.holds(_digest(a))
    assert again.holds(_digest(b))
    await _put(again, b"c" * 4, calls)
    assert again.holds(_digest(b))
    assert not again.holds(_digest(a))


async def test_a_stray_file_in_the_cache_is_removed(tmp_path: Path) -> None:
    stray = tmp_path / "inputs" / "sha256" / "not-a-digest"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"x")
    cache = _cache(tmp_path, 10)
    assert not stray.exists()
    assert cache.used_bytes == 0


async def test_a_directory_in_the_place_of_an_entry_is_removed_at_open(tmp_path: Path) -> None:
    digest = _digest(b"abc")
    squatter = tmp_path / "inputs" / "sha256" / digest
    (squatter / "inner").mkdir(parents=True)
    cache, calls = _cache(tmp_path, 10), list[str]()
    await _put(cache, b"abc", calls)
    assert cache.path_of(digest).read_bytes() == b"abc"


async def test_a_cache_directory_that_fails_is_a_coded_input_error(tmp_path: Path) -> None:
    cache, calls = _cache(tmp_path, 10), list[str]()
    (tmp_path / "inputs" / "tmp").rmdir()
    with pytest.raises(InputError) as caught:
        await _put(cache, b"abc", calls)
    assert caught.value.code == "input_cache_error"
