"""Short-lived registry logins in the signed offer: bounded, for the image's registry
only, and never shown."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.job_service import Jobs, jobs_in

from agent.jobs.images import engine_logins, offer_logins
from agent.protocol import crypto, dsse
from agent.protocol.jobs import Offer, RegistryLogin, offer_digest, sign_offer, verify_offer
from coordinator.errors import JobError
from coordinator.jobs_api import job_detail

SECRET = "short-lived-token-do-not-show"
IMAGE = "registry.example:5000/models/llm@sha256:" + "a" * 64
SPEC: dict[str, Any] = {"image": IMAGE, "command": ["true"]}
LOGIN = {"registry.example:5000": {"username": "puller", "password": SECRET}}


def _offer(**changes: Any) -> Offer:
    fields = {"job_id": "j1", "node_id": "n1", "spec": SPEC, "issued_at": 1.0, "expires_at": 9.0}
    return msgspec.convert({**fields, **changes}, Offer)


def test_a_login_signed_into_an_offer_verifies_reads_back_and_is_not_in_its_repr() -> None:
    key = crypto.generate_private_key()
    offer = _offer(registry_logins=LOGIN)
    envelope = sign_offer(offer, key, "k1")
    back = verify_offer(
        envelope, {"k1": crypto.public_key_bytes(key)}, job_id="j1", node_id="n1", now=5.0
    )
    assert back.registry_logins == {
        "registry.example:5000": RegistryLogin(username="puller", password=SECRET)
    }
    assert offer_digest(back) == offer_digest(offer)
    assert SECRET not in repr(back)
    # What the node hands its registry client and the engine for this pull.
    logins = offer_logins(back)
    assert logins["registry.example:5000"].password == SECRET
    auth = engine_logins(logins)["registry.example:5000"]
    assert (auth.serveraddress, auth.password) == ("registry.example:5000", SECRET)
    assert SECRET not in repr(auth)


def test_an_offer_without_a_login_encodes_as_before_the_field() -> None:
    assert b"registry_logins" not in msgspec.json.encode(_offer())


@pytest.mark.parametrize(
    "logins",
    [
        {"Registry.Example": {"username": "u", "password": "p"}},  # not as a reference names it
        {"r.example": {"username": "u", "password": "p\r\nHost: evil"}},
        {"r.example": {"username": "", "password": "p"}},
        {"r.example": {"username": "u", "password": "p", "extra": 1}},
        {"r.example": {"username": "u", "password": "p" * 5000}},
        {"a.example": {"username": "u", "password": "p"}, "b.example": LOGIN[next(iter(LOGIN))]},
    ],
)
def test_malformed_logins_do_not_decode(logins: object) -> None:
    with pytest.raises(msgspec.ValidationError):
        _offer(registry_logins=logins)


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[Jobs]:
    with jobs_in(tmp_path) as made:
        made.seen()
        yield made


async def test_a_submitted_login_rides_in_the_signed_offer_and_the_read_api_hides_it(
    jobs: Jobs,
) -> None:
    job_id = await jobs.service.submit(jobs.peer.node_id, SPEC, registry_logins=LOGIN)
    pending = jobs.store.streams.outbound(jobs.peer.node_id).pending
    envelope = msgspec.convert(pending[0][2]["offer"], dsse.Envelope)
    trusted = {jobs.key.key_id: jobs.key.public_key}
    offer = verify_offer(
        envelope, trusted, job_id=job_id, node_id=jobs.peer.node_id, now=time.time()
    )
    assert offer.registry_logins["registry.example:5000"].password == SECRET
    shown = msgspec.json.decode(job_detail(jobs.service, job_id, ()).body)
    # The payload is base64: a plain grep would not find the login in it. It is not shown.
    assert shown["offer"]["payload"] is None
    assert shown["offer"]["registry_logins"] == ["registry.example:5000"]
    assert SECRET not in msgspec.json.encode(shown).decode()


@pytest.mark.parametrize(
    ("spec", "logins"),
    [
        (SPEC, {"other.example": {"username": "u", "password": SECRET}}),
        ({"image": "sha256:" + "b" * 64, "command": ["true"]}, LOGIN),  # a local image
        (SPEC, {"registry.example:5000": {"username": "u", "password": SECRET + "\n"}}),
    ],
)
async def test_a_login_for_another_registry_or_malformed_is_refused_and_not_quoted(
    jobs: Jobs, spec: dict[str, Any], logins: dict[str, Any]
) -> None:
    with pytest.raises(JobError) as refused:
        await jobs.service.submit(jobs.peer.node_id, spec, registry_logins=logins)
    assert refused.value.code == "bad_registry_login"
    assert SECRET not in str(refused.value.detail)
    assert jobs.service.recent() == []
