"""Job offers and receipts: what a coordinator signs, what an agent accepts."""

from __future__ import annotations

import msgspec
import pytest

from agent.protocol import crypto, dsse
from agent.protocol.errors import AuthError
from agent.protocol.jobs import (
    OFFER_PAYLOAD_TYPE,
    Offer,
    Receipt,
    offer_digest,
    receipt_digest,
    sign_offer,
    verify_offer,
)

COORDINATOR = crypto.generate_private_key()
COORDINATOR_PUB = crypto.public_key_bytes(COORDINATOR)
KEY_ID = crypto.key_id(COORDINATOR_PUB)
TRUSTED = {KEY_ID: COORDINATOR_PUB}
NODE = "node-abc"


def _offer(**changes: object) -> Offer:
    fields: dict[str, object] = {
        "job_id": "job-1",
        "node_id": NODE,
        "spec": {"image": "busybox", "command": ["true"]},
        "issued_at": 1000.0,
        "expires_at": 2000.0,
    }
    fields.update(changes)
    return Offer(**fields)  # type: ignore[arg-type]


def test_a_signed_offer_verifies_and_reads_back() -> None:
    offer = _offer()
    envelope = sign_offer(offer, COORDINATOR, KEY_ID)
    assert envelope.payloadType == OFFER_PAYLOAD_TYPE
    assert verify_offer(envelope, TRUSTED, job_id="job-1", node_id=NODE, now=1500.0) == offer


@pytest.mark.parametrize(
    ("signer_trusted", "tamper", "code"),
    [
        (False, None, "untrusted_key"),
        (True, "payload", "bad_signature"),
        (True, "type", "bad_signature"),
    ],
)
def test_forged_offers_are_refused(signer_trusted: bool, tamper: str | None, code: str) -> None:
    key = COORDINATOR if signer_trusted else crypto.generate_private_key()
    keyid = KEY_ID if signer_trusted else crypto.key_id(crypto.public_key_bytes(key))
    envelope = sign_offer(_offer(), key, keyid)
    if tamper == "payload":
        forged = msgspec.json.encode(_offer(spec={"image": "evil"}))
        envelope = dsse.Envelope(
            crypto.b64encode(forged), envelope.payloadType, envelope.signatures
        )
    elif tamper == "type":
        envelope = dsse.Envelope(envelope.payload, "application/json", envelope.signatures)
    with pytest.raises(AuthError) as caught:
        verify_offer(envelope, TRUSTED, job_id="job-1", node_id=NODE, now=1500.0)
    assert caught.value.code == code


def test_an_offer_with_no_signature_is_refused() -> None:
    envelope = sign_offer(_offer(), COORDINATOR, KEY_ID)
    unsigned = dsse.Envelope(envelope.payload, envelope.payloadType, [])
    with pytest.raises(AuthError) as caught:
        verify_offer(unsigned, TRUSTED, job_id="job-1", node_id=NODE, now=1500.0)
    assert caught.value.code == "untrusted_key"


def test_a_trusted_signature_over_something_else_is_not_an_offer() -> None:
    # A coordinator-signed envelope of another payload type must not pass as an offer.
    envelope = dsse.sign_envelope(msgspec.json.encode(_offer()), "text/plain", COORDINATOR, KEY_ID)
    with pytest.raises(AuthError) as caught:
        verify_offer(envelope, TRUSTED, job_id="job-1", node_id=NODE, now=1500.0)
    assert caught.value.code == "bad_offer"
    junk = dsse.sign_envelope(b'{"job_id": 1}', OFFER_PAYLOAD_TYPE, COORDINATOR, KEY_ID)
    with pytest.raises(AuthError) as caught:
        verify_offer(junk, TRUSTED, job_id="job-1", node_id=NODE, now=1500.0)
    assert caught.value.code == "bad_offer"


@pytest.mark.parametrize(
    ("job_id", "node_id", "now", "code"),
    [
        ("job-2", NODE, 1500.0, "bad_offer"),
        ("job-1", "node-other", 1500.0, "node_mismatch"),
        ("job-1", NODE, 2000.5, "offer_expired"),
    ],
)
def test_an_offer_for_another_job_node_or_time_is_refused(
    job_id: str, node_id: str, now: float, code: str
) -> None:
    envelope = sign_offer(_offer(), COORDINATOR, KEY_ID)
    with pytest.raises(AuthError) as caught:
        verify_offer(envelope, TRUSTED, job_id=job_id, node_id=node_id, now=now)
    assert caught.value.code == code


def test_digests_are_the_same_for_a_struct_and_its_json() -> None:
    receipt = Receipt(
        job_id="job-1", node_id=NODE, state="completed", offer_sha256="a" * 64, spec_digest="x"
    )
    assert receipt_digest(receipt) == receipt_digest(
        msgspec.json.decode(msgspec.json.encode(receipt))
    )
    assert receipt_digest(receipt) != receipt_digest(
        Receipt(
            job_id="job-1", node_id=NODE, state="failed", offer_sha256="a" * 64, spec_digest="x"
        )
    )
    assert offer_digest(_offer()) != offer_digest(_offer(job_id="job-2"))


def test_a_receipt_decodes_back_first_in_its_chain_or_not() -> None:
    first = Receipt(
        job_id="job-1", node_id=NODE, state="completed", offer_sha256="a" * 64, spec_digest="x"
    )
    second = msgspec.structs.replace(first, job_id="job-2", prev_receipt=receipt_digest(first))
    for receipt in (first, second):
        assert msgspec.json.decode(msgspec.json.encode(receipt), type=Receipt) == receipt
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            msgspec.json.encode(msgspec.structs.replace(first, prev_receipt="xyz")), type=Receipt
        )
