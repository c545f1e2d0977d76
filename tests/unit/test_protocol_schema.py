"""The committed schema and the protocol page agree with the types."""

from __future__ import annotations

import base64
import importlib.util
import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol import errors
from agent.protocol.messages import (
    AGENT_SENDS,
    COORDINATOR_SENDS,
    Auth,
    Challenge,
    Hello,
    Message,
    auth_signed_bytes,
    challenge_signed_bytes,
    decode_frame,
    message_type,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocol.md"
SCHEMA = ROOT / "docs" / "protocol.schema.json"


def render_schema() -> str:
    spec = importlib.util.spec_from_file_location(
        "gen_protocol_schema", ROOT / "scripts" / "gen_protocol_schema.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text: str = module.render()
    return text


def doc_examples() -> list[Message]:
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    return [decode_frame(block) for block in blocks]


def test_committed_schema_matches_the_types() -> None:
    assert SCHEMA.read_text(encoding="utf-8") == render_schema(), (
        "run: python scripts/gen_protocol_schema.py > docs/protocol.schema.json"
    )


def test_every_example_in_the_protocol_page_decodes() -> None:
    # decode_frame raises on the first example that is not a valid message.
    assert len(doc_examples()) >= 14


def test_the_protocol_page_shows_every_message_type() -> None:
    assert {message_type(m) for m in doc_examples()} == AGENT_SENDS | COORDINATOR_SENDS


def test_the_handshake_example_signatures_verify() -> None:
    by_type = {message_type(m): m for m in doc_examples()}
    hello, challenge, auth = by_type["hello"], by_type["challenge"], by_type["auth"]
    assert isinstance(hello, Hello)
    assert isinstance(challenge, Challenge)
    assert isinstance(auth, Auth)
    h, c = hello.body, challenge.body
    agent_key = Ed25519PublicKey.from_public_bytes(base64.b64decode(h.public_key))
    coordinator_public = Ed25519PublicKey.from_public_bytes(
        base64.b64decode("Kay64UG8yvCyLhqU000LxzYeUm0L/hLIl5S8kyKWbdc=")
    )
    coordinator_public.verify(
        base64.b64decode(c.signature),
        challenge_signed_bytes(h.agent_nonce, c.coordinator_nonce, h.node_id),
    )
    agent_key.verify(
        base64.b64decode(auth.body.signature),
        auth_signed_bytes(h.agent_nonce, c.coordinator_nonce, h.node_id, c.key_id),
    )


def test_the_protocol_page_lists_every_error_code() -> None:
    tree = errors.__doc__ or ""
    codes = set(re.findall(r"\b[a-z]+(?:_[a-z]+)+\b", tree.split("::", 1)[1]))
    assert "seq_gap" in codes
    page = DOC.read_text(encoding="utf-8")
    assert sorted(c for c in codes if f"`{c}`" not in page) == []
