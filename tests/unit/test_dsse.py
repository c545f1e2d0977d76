"""DSSE envelopes and in-toto attestations: what verifies, and the code of what does not."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from agent.protocol import crypto, dsse
from agent.protocol.errors import AuthError


class Node:
    """A key with the names derived from it, as a test signer."""

    def __init__(self) -> None:
        self.key = crypto.generate_private_key()
        self.public = crypto.public_key_bytes(self.key)
        self.keyid = crypto.key_id(self.public)
        self.node_id = crypto.node_id(self.public)
        self.trusted = {self.keyid: self.public}


@pytest.fixture
def node() -> Node:
    return Node()


@pytest.fixture
def other() -> Node:
    return Node()


PROFILE: dict[str, Any] = {
    "agent_version": "0.1.0",
    "gpus": [{"id": "GPU-1", "vendor": "nvidia", "vram_total_bytes": 25769803776}],
    "taken_at": 1700000000.25,
}
RECEIPT: dict[str, Any] = {"job_id": "j-1", "exit_code": 0, "previous": None}


def _code(envelope: dsse.Envelope, trusted: dict[str, bytes]) -> str:
    with pytest.raises(AuthError) as raised:
        dsse.verify_envelope(envelope, trusted)
    return raised.value.code


def _replace(envelope: dsse.Envelope, **fields: Any) -> dsse.Envelope:
    return msgspec.structs.replace(envelope, **fields)


# --- PAE and the envelope -----------------------------------------------------------------


def test_pae_matches_the_example_of_the_dsse_protocol() -> None:
    # protocol.md, "Test Vectors".
    pae = dsse.pae("http://example.com/HelloWorld", b"hello world")
    assert pae == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_pae_counts_bytes_of_the_utf8_type_and_keeps_an_empty_body() -> None:
    assert dsse.pae("t\u00e4", b"") == b"DSSEv1 3 t\xc3\xa4 0 "


def test_envelope_json_uses_the_field_names_of_the_spec(node: Node) -> None:
    envelope = dsse.sign_envelope(b"hello world", "http://example.com/HelloWorld", node.key, "k")
    decoded = msgspec.json.decode(msgspec.json.encode(envelope))
    assert decoded == {
        "payload": "aGVsbG8gd29ybGQ=",
        "payloadType": "http://example.com/HelloWorld",
        "signatures": [{"keyid": "k", "sig": envelope.signatures[0].sig}],
    }


def test_envelope_decodes_a_signature_without_keyid_and_refuses_unknown_fields() -> None:
    data = b'{"payload":"","payloadType":"t","signatures":[{"sig":"AA=="}]}'
    envelope = msgspec.json.decode(data, type=dsse.Envelope)
    assert envelope.signatures == [dsse.Signature(keyid="", sig="AA==")]
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.json.decode(data[:-1] + b',"extra":1}', type=dsse.Envelope)


def test_a_signed_envelope_verifies_to_its_payload(node: Node) -> None:
    envelope = dsse.sign_envelope(b"body", "application/x-test", node.key, node.keyid)
    assert dsse.verify_envelope(envelope, node.trusted) == b"body"


def test_an_envelope_in_url_safe_base64_without_padding_verifies(node: Node) -> None:
    payload = b"\xfb\xff\xbf>?"
    envelope = dsse.sign_envelope(payload, "application/x-test", node.key, node.keyid)
    table = str.maketrans("+/", "-_", "=")
    url_safe = _replace(
        envelope,
        payload=envelope.payload.translate(table),
        signatures=[
            dsse.Signature(keyid=node.keyid, sig=envelope.signatures[0].sig.translate(table))
        ],
    )
    assert "-" in url_safe.payload
    assert dsse.verify_envelope(url_safe, node.trusted) == payload


def test_a_signature_without_keyid_is_tried_against_every_trusted_key(
    node: Node, other: Node
) -> None:
    envelope = dsse.sign_envelope(b"body", "application/x-test", node.key, "")
    assert dsse.verify_envelope(envelope, {**other.trusted, **node.trusted}) == b"body"


def test_one_trusted_signature_among_untrusted_ones_is_enough(node: Node, other: Node) -> None:
    theirs = dsse.sign_envelope(b"body", "application/x-test", other.key, other.keyid)
    ours = dsse.sign_envelope(b"body", "application/x-test", node.key, node.keyid)
    both = _replace(ours, signatures=[*theirs.signatures, *ours.signatures])
    assert dsse.verify_envelope(both, node.trusted) == b"body"


# --- refusals -------------------------------------------------------------------------------


def test_a_tampered_payload_is_a_bad_signature(node: Node) -> None:
    envelope = dsse.sign_envelope(b"body", "application/x-test", node.key, node.keyid)
    tampered = _replace(envelope, payload=crypto.b64encode(b"bodY"))
    assert _code(tampered, node.trusted) == "bad_signature"


def test_a_tampered_payload_type_is_a_bad_signature(node: Node) -> None:
    envelope = dsse.sign_envelope(b"body", "application/x-test", node.key, node.keyid)
    assert _code(_replace(envelope, payloadType="application/x-other"), node.trusted) == (
        "bad_signature"
    )


def test_a_signature_by_an_untrusted_key_is_refused(node: Node, other: Node) -> None:
    envelope = dsse.sign_envelope(b"body", "application/x-test", other.key, other.keyid)
    assert _code(envelope, node.trusted) == "untrusted_key"
    keyless = dsse.sign_envelope(b"body", "application/x-test", other.key, "")
    assert _code(keyless, node.trusted) == "untrusted_key"


def test_another_key_claiming_a_trusted_keyid_is_a_bad_signature(node: Node, other: Node) -> None:
    envelope = dsse.sign_envelope(b"body", "application/x-test", other.key, node.keyid)
    assert _code(envelope, node.trusted) == "bad_signature"


def test_an_envelope_without_signatures_is_refused(node: Node) -> None:
    envelope = dsse.sign_envelope(b"body", "application/x-test", node.key, node.keyid)
    assert _code(_replace(envelope, signatures=[]), node.trusted) == "untrusted_key"


def test_nothing_is_trusted_when_the_trusted_set_is_empty(node: Node) -> None:
    envelope = dsse.sign_envelope(b"body", "application/x-test", node.key, node.keyid)
    assert _code(envelope, {}) == "untrusted_key"


@pytest.mark.parametrize("field", ["payload", "sig"])
@pytest.mark.parametrize("garbage", ["not base64!", "a", "+_+_"])
def test_malformed_base64_is_a_bad_signature(node: Node, field: str, garbage: str) -> None:
    envelope = dsse.sign_envelope(b"body", "application/x-test", node.key, node.keyid)
    if field == "payload":
        broken = _replace(envelope, payload=garbage)
    else:
        broken = _replace(envelope, signatures=[dsse.Signature(keyid=node.keyid, sig=garbage)])
    assert _code(broken, node.trusted) == "bad_signature"


def test_a_payload_type_that_is_not_utf8_encodable_is_a_bad_signature(node: Node) -> None:
    envelope = dsse.sign_envelope(b"body", "application/x-test", node.key, node.keyid)
    assert _code(_replace(envelope, payloadType="\ud800"), node.trusted) == "bad_signature"


# --- in-toto statements ---------------------------------------------------------------------


class Predicate(msgspec.Struct):
    value: int


def test_an_attestation_carries_an_in_toto_statement_v1(node: Node) -> None:
    digest = "ab" * 32
    envelope = dsse.attest(
        "thing", digest, "https://example.com/p/v1", {"a": 1}, key=node.key, keyid=node.keyid
    )
    assert envelope.payloadType == "application/vnd.in-toto+json"
    statement = msgspec.json.decode(crypto.b64decode(envelope.payload))
    assert statement == {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "thing", "digest": {"sha256": digest}}],
        "predicateType": "https://example.com/p/v1",
        "predicate": {"a": 1},
    }
    verified = dsse.verify_attestation(envelope, node.trusted, "https://example.com/p/v1")
    assert verified.type == dsse.STATEMENT_TYPE
    assert verified.subject == [dsse.Subject(name="thing", digest={"sha256": digest})]
    assert verified.predicate == {"a": 1}


def test_a_struct_predicate_is_encoded_as_its_fields(node: Node) -> None:
    envelope = dsse.attest("t", "00" * 32, "p", Predicate(value=3), key=node.key, keyid="")
    assert dsse.verify_attestation(envelope, node.trusted, "p").predicate == {"value": 3}


@pytest.mark.parametrize("digest", ["AB" * 32, "ab" * 31, "sha256:" + "ab" * 32])
def test_attest_refuses_a_digest_that_is_not_lowercase_hex_sha256(node: Node, digest: str) -> None:
    with pytest.raises(ValueError, match="sha256"):
        dsse.attest("t", digest, "p", {}, key=node.key, keyid=node.keyid)


def test_attestation_of_another_predicate_type_is_a_bad_statement(node: Node) -> None:
    envelope = dsse.attest("t", "00" * 32, "p", {}, key=node.key, keyid=node.keyid)
    with pytest.raises(AuthError) as raised:
        dsse.verify_attestation(envelope, node.trusted, "q")
    assert raised.value.code == "bad_statement"


@pytest.mark.parametrize(
    ("payload_type", "payload"),
    [
        ("application/json", b'{"_type":"https://in-toto.io/Statement/v1"}'),
        (dsse.PAYLOAD_TYPE, b"not json"),
        (dsse.PAYLOAD_TYPE, b"[]"),
        (
            dsse.PAYLOAD_TYPE,
            b'{"_type":"https://in-toto.io/Statement/v0.1","subject":[{"name":"t",'
            b'"digest":{"sha256":"00"}}],"predicateType":"p","predicate":{}}',
        ),
        (
            dsse.PAYLOAD_TYPE,
            b'{"_type":"https://in-toto.io/Statement/v1","subject":[],'
            b'"predicateType":"p","predicate":{}}',
        ),
        (
            dsse.PAYLOAD_TYPE,
            b'{"_type":"https://in-toto.io/Statement/v1","subject":[{"name":"t",'
            b'"digest":{"sha256":"00"}}],"predicateType":"p","predicate":{},"extra":1}',
        ),
    ],
    ids=["payload-type", "not-json", "not-object", "statement-v0.1", "no-subject", "extra"],
)
def test_a_signed_payload_that_is_not_a_v1_statement_is_a_bad_statement(
    node: Node, payload_type: str, payload: bytes
) -> None:
    envelope = dsse.sign_envelope(payload, payload_type, node.key, node.keyid)
    with pytest.raises(AuthError) as raised:
        dsse.verify_attestation(envelope, node.trusted, "p")
    assert raised.value.code == "bad_statement"


def test_a_statement_is_checked_only_after_its_signature(node: Node, other: Node) -> None:
    envelope = dsse.sign_envelope(b"not json", dsse.PAYLOAD_TYPE, other.key, other.keyid)
    with pytest.raises(AuthError) as raised:
        dsse.verify_attestation(envelope, node.trusted, "p")
    assert raised.value.code == "untrusted_key"


# --- hardware profile -------------------------------------------------------------------------


def _profile_code(envelope: dsse.Envelope, node: Node, nonce: str = "n-1") -> str:
    with pytest.raises(AuthError) as raised:
        dsse.verify_profile_attestation(envelope, node.trusted, nonce, node.node_id)
    return raised.value.code


def test_a_profile_attestation_verifies_to_the_profile(node: Node) -> None:
    envelope = dsse.attest_profile(PROFILE, "n-1", node.node_id, node.key, node.keyid)
    statement = dsse.verify_attestation(envelope, node.trusted, dsse.PROFILE_PREDICATE)
    assert statement.subject == [
        dsse.Subject(name=node.node_id, digest={"sha256": dsse.json_sha256(PROFILE)})
    ]
    assert statement.predicate == {"nonce": "n-1", "profile": PROFILE}
    verified = dsse.verify_profile_attestation(envelope, node.trusted, "n-1", node.node_id)
    assert verified == PROFILE


def test_verify_profile_gives_the_nonce_answered_and_the_profile(node: Node) -> None:
    envelope = dsse.attest_profile(PROFILE, "n-7", node.node_id, node.key, node.keyid)
    assert dsse.verify_profile(envelope, node.trusted, node.node_id) == ("n-7", PROFILE)


def test_a_profile_is_checked_with_one_signature_verification(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every node attests again when a coordinator restarts: its signature is the check's
    # main cost, and verifying it twice bought nothing.
    calls: list[bytes] = []
    real = crypto.verify

    def counting(public_key: bytes, data: bytes, signature: bytes) -> bool:
        calls.append(data)
        return real(public_key, data, signature)

    envelope = dsse.attest_profile(PROFILE, "n-1", node.node_id, node.key, node.keyid)
    monkeypatch.setattr(crypto, "verify", counting)
    assert dsse.verify_profile(envelope, node.trusted, node.node_id) == ("n-1", PROFILE)
    assert len(calls) == 1


def _forged(node: Node, other: Node, case: str) -> dsse.Envelope:
    if case == "another node's key":
        return dsse.attest_profile(PROFILE, "n-1", node.node_id, other.key, node.keyid)
    if case == "about another node":
        return dsse.attest_profile(PROFILE, "n-1", other.node_id, node.key, node.keyid)
    if case == "digest of another profile":
        predicate = {"nonce": "n-1", "profile": PROFILE}
        digest = dsse.json_sha256({**PROFILE, "host": {"cpus": 1}})
        return dsse.attest(
            node.node_id, digest, dsse.PROFILE_PREDICATE, predicate, key=node.key, keyid=""
        )
    assert case == "a receipt"
    return dsse.attest_receipt(RECEIPT, node.node_id, node.key, node.keyid)


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("another node's key", "bad_signature"),
        ("about another node", "node_mismatch"),
        ("digest of another profile", "bad_statement"),
        ("a receipt", "bad_statement"),
    ],
)
def test_verify_profile_refuses_a_forged_or_malformed_profile(
    node: Node, other: Node, case: str, code: str
) -> None:
    with pytest.raises(AuthError) as raised:
        dsse.verify_profile(_forged(node, other, case), node.trusted, node.node_id)
    assert raised.value.code == code


def test_a_profile_is_attested_in_the_form_it_has_in_json(node: Node) -> None:
    profile: dict[str, Any] = {"pair": (1, 2), "raw": b"\x00", "nested": Predicate(value=1)}
    envelope = dsse.attest_profile(profile, "n-1", node.node_id, node.key, node.keyid)
    verified = dsse.verify_profile_attestation(envelope, node.trusted, "n-1", node.node_id)
    assert verified == {"pair": [1, 2], "raw": "AA==", "nested": {"value": 1}}


def test_a_profile_with_keys_that_are_not_strings_cannot_be_attested(node: Node) -> None:
    profile: dict[Any, Any] = {10: "a"}
    with pytest.raises(TypeError):
        dsse.attest_profile(profile, "n-1", node.node_id, node.key, node.keyid)


def test_a_profile_for_another_nonce_is_stale(node: Node) -> None:
    envelope = dsse.attest_profile(PROFILE, "n-0", node.node_id, node.key, node.keyid)
    assert _profile_code(envelope, node) == "stale_nonce"


def test_a_profile_about_another_node_is_a_node_mismatch(node: Node, other: Node) -> None:
    envelope = dsse.attest_profile(PROFILE, "n-1", other.node_id, node.key, node.keyid)
    assert _profile_code(envelope, node) == "node_mismatch"


def test_a_trusted_key_of_another_node_cannot_attest_for_this_one(node: Node, other: Node) -> None:
    envelope = dsse.attest_profile(PROFILE, "n-1", node.node_id, other.key, other.keyid)
    with pytest.raises(AuthError) as raised:
        dsse.verify_profile_attestation(
            envelope, {**node.trusted, **other.trusted}, "n-1", node.node_id
        )
    assert raised.value.code == "node_mismatch"


def test_a_profile_that_does_not_match_its_subject_digest_is_a_bad_statement(
    node: Node,
) -> None:
    predicate = {"nonce": "n-1", "profile": PROFILE}
    envelope = dsse.attest(
        node.node_id, "00" * 32, dsse.PROFILE_PREDICATE, predicate, key=node.key, keyid=""
    )
    assert _profile_code(envelope, node) == "bad_statement"


@pytest.mark.parametrize(
    "predicate",
    [
        {"profile": PROFILE},
        {"nonce": 1, "profile": PROFILE},
        {"nonce": "n-1", "profile": [PROFILE]},
        {"nonce": "n-1", "profile": PROFILE, "extra": True},
    ],
)
def test_a_profile_predicate_of_another_shape_is_a_bad_statement(
    node: Node, predicate: dict[str, Any]
) -> None:
    envelope = dsse.attest(
        node.node_id,
        dsse.json_sha256(PROFILE),
        dsse.PROFILE_PREDICATE,
        predicate,
        key=node.key,
        keyid=node.keyid,
    )
    assert _profile_code(envelope, node) == "bad_statement"


def test_a_receipt_is_not_accepted_as_a_profile(node: Node) -> None:
    envelope = dsse.attest_receipt(RECEIPT, node.node_id, node.key, node.keyid)
    assert _profile_code(envelope, node) == "bad_statement"


# --- job receipts -----------------------------------------------------------------------------


def _receipt_code(envelope: dsse.Envelope, node: Node) -> str:
    with pytest.raises(AuthError) as raised:
        dsse.verify_receipt(envelope, node.trusted, node.node_id)
    return raised.value.code


def test_a_receipt_verifies_to_the_receipt(node: Node) -> None:
    envelope = dsse.attest_receipt(RECEIPT, node.node_id, node.key, node.keyid)
    assert dsse.verify_receipt(envelope, node.trusted, node.node_id) == RECEIPT
    statement = dsse.verify_attestation(envelope, node.trusted, dsse.RECEIPT_PREDICATE)
    assert statement.subject[0].digest == {"sha256": dsse.json_sha256(RECEIPT)}


def test_a_receipt_about_another_node_is_a_node_mismatch(node: Node, other: Node) -> None:
    envelope = dsse.attest_receipt(RECEIPT, other.node_id, node.key, node.keyid)
    assert _receipt_code(envelope, node) == "node_mismatch"


def test_a_receipt_that_does_not_match_its_digest_is_a_bad_statement(node: Node) -> None:
    envelope = dsse.attest(
        node.node_id,
        dsse.json_sha256({**RECEIPT, "exit_code": 1}),
        dsse.RECEIPT_PREDICATE,
        {"receipt": RECEIPT},
        key=node.key,
        keyid=node.keyid,
    )
    assert _receipt_code(envelope, node) == "bad_statement"


def test_a_receipt_predicate_of_another_shape_is_a_bad_statement(node: Node) -> None:
    envelope = dsse.attest(
        node.node_id,
        dsse.json_sha256(RECEIPT),
        dsse.RECEIPT_PREDICATE,
        RECEIPT,
        key=node.key,
        keyid=node.keyid,
    )
    assert _receipt_code(envelope, node) == "bad_statement"


def test_canonical_json_sorts_keys_and_json_sha256_hashes_it() -> None:
    assert dsse.canonical_json({"b": 1, "a": [2, {"d": 3, "c": 4}]}) == (
        b'{"a":[2,{"c":4,"d":3}],"b":1}'
    )
    assert dsse.json_sha256({}) == (
        "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    )
