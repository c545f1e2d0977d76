"""The agent's uploader against a real S3 API server (moto) with boto3-presigned URLs."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.s3 import S3, running_s3

from agent.errors import UploadError
from agent.jobs.uploader import RetryPolicy, put_file
from agent.protocol.uploads import UploadTarget


@pytest.fixture
def s3() -> Iterator[S3]:
    with running_s3() as server:
        yield server


def _file(tmp_path: Path, size: int) -> tuple[Path, str]:
    path = tmp_path / "out.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


async def test_presigned_put_stores_the_exact_bytes(s3: S3, tmp_path: Path) -> None:
    path, digest = _file(tmp_path, 3 * (1 << 20) + 17)
    target = UploadTarget(url=s3.presign_put("job-1/result.bin"))
    async with httpx.AsyncClient() as client:
        await put_file(client, path, target, size=path.stat().st_size, sha256=digest)
    assert s3.sha256("job-1/result.bin") == digest


async def test_an_empty_output_is_stored_empty(s3: S3, tmp_path: Path) -> None:
    path, digest = _file(tmp_path, 0)
    target = UploadTarget(url=s3.presign_put("empty"))
    async with httpx.AsyncClient() as client:
        await put_file(client, path, target, size=0, sha256=digest)
    assert s3.sha256("empty") == digest


async def test_a_store_that_is_down_is_retried_then_fails(tmp_path: Path) -> None:
    path, digest = _file(tmp_path, 10)
    with running_s3() as gone:
        url = gone.presign_put("x")
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    policy = RetryPolicy(attempts=3, base_s=0.01, max_s=0.02, timeout_s=5)
    async with httpx.AsyncClient() as client:
        with pytest.raises(UploadError) as caught:
            await put_file(
                client,
                path,
                UploadTarget(url=url),
                size=10,
                sha256=digest,
                policy=policy,
                sleep=sleep,
            )
    assert caught.value.code == "upload_failed"
    assert len(waits) == 2


async def test_a_spool_file_changed_since_hashing_is_not_reported_stored(
    s3: S3, tmp_path: Path
) -> None:
    path, _ = _file(tmp_path, 64)
    async with httpx.AsyncClient() as client:
        with pytest.raises(UploadError) as caught:
            await put_file(
                client, path, UploadTarget(url=s3.presign_put("y")), size=64, sha256="0" * 64
            )
    assert caught.value.code == "output_changed"
