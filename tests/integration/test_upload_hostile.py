"""The uploader against a store that refuses, fails, or lies about nothing but answers badly."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.store import Store, running_store

from agent.errors import UploadError
from agent.jobs.uploader import RetryPolicy, put_file
from agent.protocol.uploads import UploadTarget

_FAST = RetryPolicy(attempts=3, base_s=0.001, max_s=0.002, timeout_s=10)


@pytest.fixture
def store() -> Iterator[Store]:
    with running_store() as running:
        yield running


def _file(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "out"
    path.write_bytes(b"result\n" * 1000)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


async def _put(store: Store, path: Path, digest: str) -> None:
    target = UploadTarget(url=f"{store.url}/obj", headers={"X-Token": "t"})
    async with httpx.AsyncClient() as client:
        await put_file(client, path, target, size=7000, sha256=digest, policy=_FAST)


async def test_a_500_then_a_503_are_retried_and_the_third_put_stores(
    store: Store, tmp_path: Path
) -> None:
    path, digest = _file(tmp_path)
    store.script = [500, 503]
    await _put(store, path, digest)
    assert store.puts == 3
    assert store.objects == {"/obj": digest}


async def test_a_403_is_final_and_not_retried(store: Store, tmp_path: Path) -> None:
    path, digest = _file(tmp_path)
    store.script = [403]
    with pytest.raises(UploadError) as caught:
        await _put(store, path, digest)
    assert caught.value.code == "upload_refused"
    assert store.puts == 1


async def test_500s_past_the_retries_fail_upload_failed(store: Store, tmp_path: Path) -> None:
    path, digest = _file(tmp_path)
    store.script = [500, 500, 500, 500]
    with pytest.raises(UploadError) as caught:
        await _put(store, path, digest)
    assert caught.value.code == "upload_failed"
    assert store.puts == 3
    assert store.objects == {}


async def test_a_store_that_refuses_connections_is_retried_until_the_deadline(
    tmp_path: Path,
) -> None:
    path, digest = _file(tmp_path)
    with running_store() as gone:
        url = f"{gone.url}/obj"
    now = [1000.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:  # time passes without waiting for it
        waits.append(seconds)
        now[0] += seconds

    policy = RetryPolicy(base_s=1.0, max_s=8.0, timeout_s=10)  # no cap on attempts
    async with httpx.AsyncClient() as client:
        with pytest.raises(UploadError) as caught:
            await put_file(
                client,
                path,
                UploadTarget(url=url),
                size=7000,
                sha256=digest,
                policy=policy,
                deadline=1000.0 + 600,
                clock=lambda: now[0],
                sleep=sleep,
            )
    assert caught.value.code == "upload_failed"
    assert "ConnectError" in caught.value.detail
    # Backed off up to its ceiling, and gave up only where the next try would pass the
    # deadline: never before it.
    assert max(waits) <= 8.0
    assert len(waits) > 10
    assert now[0] <= 1600.0
