"""The artifact store's upload tokens: bound to one job, one output path and a time."""

from __future__ import annotations

import pytest

from coordinator.artifact_tokens import sign_token, verify_token
from coordinator.errors import JobError

SECRET = b"s" * 32


def test_a_token_lets_its_job_and_path_in_until_it_expires() -> None:
    token = sign_token(SECRET, "job-1", "out/result.txt", 1000)
    verify_token(SECRET, token, job_id="job-1", path="out/result.txt", now=1000)


@pytest.mark.parametrize(
    ("secret", "job_id", "path", "now", "code"),
    [
        (SECRET, "job-2", "out/result.txt", 10, "bad_token"),
        (SECRET, "job-1", "out/other.txt", 10, "bad_token"),
        (SECRET, "job-1", "out/result.txt\0", 10, "bad_token"),
        (b"t" * 32, "job-1", "out/result.txt", 10, "bad_token"),
        (SECRET, "job-1", "out/result.txt", 1000.5, "token_expired"),
    ],
)
def test_a_token_for_anything_else_is_refused(
    secret: bytes, job_id: str, path: str, now: float, code: str
) -> None:
    token = sign_token(SECRET, "job-1", "out/result.txt", 1000)
    with pytest.raises(JobError) as caught:
        verify_token(secret, token, job_id=job_id, path=path, now=now)
    assert caught.value.code == code


@pytest.mark.parametrize(
    "token",
    [
        "",
        "1000",
        "1000.",
        ".abc",
        "x.abc",
        "1000.a\n",
        "9" * 13 + "." + "A" * 43,
        "1000." + "A" * 44,
    ],
)
def test_a_malformed_token_is_refused(token: str) -> None:
    with pytest.raises(JobError) as caught:
        verify_token(SECRET, token, job_id="job-1", path="p", now=0)
    assert caught.value.code == "bad_token"


def test_a_later_expiry_cannot_be_grafted_onto_a_mac() -> None:
    mac = sign_token(SECRET, "job-1", "p", 1000).split(".", 1)[1]
    with pytest.raises(JobError) as caught:
        verify_token(SECRET, f"99999.{mac}", job_id="job-1", path="p", now=2000)
    assert caught.value.code == "bad_token"
