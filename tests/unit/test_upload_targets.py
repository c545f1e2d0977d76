"""Upload targets in the signed offer, and the uploader's pure retry policy."""

from __future__ import annotations

import msgspec
import pytest

from agent.jobs.uploader import RetryPolicy, backoff, retryable
from agent.protocol import crypto
from agent.protocol.errors import DecodeError
from agent.protocol.jobs import Offer, UploadTarget, offer_digest, sign_offer, verify_offer
from agent.protocol.uploads import MAX_UPLOADS, check_uploads

_SPEC = {"image": "sha256:" + "a" * 64, "outputs": ["result.txt", "logs/run.log"]}


def _offer(**changes: object) -> Offer:
    fields: dict[str, object] = {
        "job_id": "j1",
        "node_id": "n1",
        "spec": _SPEC,
        "issued_at": 1000.0,
        "expires_at": 2000.0,
    }
    return Offer(**{**fields, **changes})  # type: ignore[arg-type]


def test_an_offer_without_targets_encodes_and_digests_as_before_the_field() -> None:
    old = b'{"job_id":"j1","node_id":"n1","spec":{},"issued_at":1.0,"expires_at":2.0}'
    offer = msgspec.json.decode(old, type=Offer)
    assert offer.uploads == {}
    assert msgspec.json.encode(offer) == old


def test_signed_targets_verify_and_read_back() -> None:
    key = crypto.generate_private_key()
    target = UploadTarget(url="https://s3.example/b/k?X-Amz-Signature=ab", headers={"x-a": "1"})
    offer = _offer(uploads={"result.txt": target})
    envelope = sign_offer(offer, key, "k1")
    trusted = {"k1": crypto.public_key_bytes(key)}
    back = verify_offer(envelope, trusted, job_id="j1", node_id="n1", now=1500.0)
    assert back.uploads == {"result.txt": target}
    assert offer_digest(back) == offer_digest(offer)


@pytest.mark.parametrize(
    "uploads",
    [
        {"result.txt": {"url": "https://x/y", "extra": 1}},  # unknown field
        {"result.txt": {"url": "https://x/y", "headers": {"X-A\r\nHost": "v"}}},
        {"result.txt": {"url": "https://x/y", "headers": {"X-A": "v\r\nHost: evil"}}},
        {"result.txt": {"url": "https://x/" + "a" * 5000}},
        {"result.txt": {"url": "https://x/y", "headers": {f"h{i}": "v" for i in range(17)}}},
        {f"o{i}": {"url": "https://x/y"} for i in range(MAX_UPLOADS + 1)},
    ],
)
def test_malformed_or_oversized_targets_do_not_decode(uploads: object) -> None:
    raw = msgspec.json.encode(msgspec.to_builtins(_offer()) | {"uploads": uploads})
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(raw, type=Offer)


@pytest.mark.parametrize(
    ("path", "url", "headers", "why"),
    [
        ("other.txt", "https://x/y", {}, "not one of the spec's outputs"),
        ("../result.txt", "https://x/y", {}, "not one of the spec's outputs"),
        ("result.txt", "file:///etc/passwd", {}, "scheme"),
        ("result.txt", "ftp://x/y", {}, "scheme"),
        ("result.txt", "https://user:pw@x/y", {}, "credentials"),
        ("result.txt", "https://x:0/y", {}, "no usable host"),
        ("result.txt", "https://x:99999/y", {}, "not a URL"),
        ("result.txt", "https:///y", {}, "no usable host"),
        ("result.txt", "https://x/y#f", {}, "fragment"),
        ("result.txt", "https://x/y", {"Content-Length": "1"}, "client's"),
        ("result.txt", "https://x/y", {"host": "elsewhere"}, "client's"),
        ("result.txt", "https://x/y", {"Transfer-Encoding": "chunked"}, "client's"),
    ],
)
def test_targets_that_do_not_fit_the_spec_are_refused_with_a_code(
    path: str, url: str, headers: dict[str, str], why: str
) -> None:
    with pytest.raises(DecodeError) as caught:
        check_uploads({path: UploadTarget(url=url, headers=headers)}, _SPEC["outputs"])
    assert caught.value.code == "bad_upload_target"
    assert why in caught.value.detail


def test_targets_for_declared_outputs_pass() -> None:
    check_uploads(
        {
            "result.txt": UploadTarget(url="http://127.0.0.1:9000/b/k?sig=1"),
            "logs/run.log": UploadTarget(url="https://[::1]:8443/a", headers={"X-Amz-Acl": "x"}),
        },
        _SPEC["outputs"],
    )


def test_backoff_grows_exponentially_to_its_ceiling_under_full_jitter() -> None:
    policy = RetryPolicy(base_s=0.5, max_s=4.0)
    assert [backoff(n, policy, lambda: 1.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert backoff(3, policy, lambda: 0.0) == 0.0
    assert backoff(3, policy, lambda: 0.5) == 1.0


@pytest.mark.parametrize(
    ("status", "again"),
    [
        (408, True),
        (429, True),
        (500, True),
        (503, True),
        (400, False),
        (403, False),
        (404, False),
        (413, False),
    ],
)
def test_only_answers_that_may_change_are_retried(status: int, again: bool) -> None:
    assert retryable(status) is again
