"""The gateway's pure decisions: which replica, which key may pass, what usage a server
reported, what a request's body asks for."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from support.factories import request_record

from coordinator.errors import GatewayError
from coordinator.gateway import answers
from coordinator.gateway import usage as usage_module
from coordinator.gateway.limits import RateLimits, bearer, retry_after
from coordinator.gateway.routing import Full, Replica, Router
from coordinator.gateway.tables import hash_key
from coordinator.gateway.usage import MAX_BODY_BYTES, MAX_LINE_BYTES, Usage, UsageReader
from coordinator.store import Store


def _replica(job_id: str, models: tuple[str, ...] = ("tiny",), max_streams: int = 2) -> Replica:
    return Replica(job_id=job_id, node_id="node-" + job_id, models=models, max_streams=max_streams)


def test_the_replica_with_fewest_requests_in_flight_is_picked() -> None:
    router = Router()
    a, b = _replica("a", max_streams=5), _replica("b", max_streams=5)
    assert router.pick([a, b], "tiny") == a
    assert router.pick([a, b], "tiny") == b  # a has one in flight
    assert router.pick([a, b], "tiny") in (a, b)
    router.release("a")
    router.release("a")
    assert router.outstanding("a") == 0
    assert router.pick([a, b], "tiny") == a  # fewest, whatever the turn


def test_tied_replicas_take_turns() -> None:
    router = Router()
    replicas = [_replica("a"), _replica("b"), _replica("c")]
    picked = []
    for _ in range(6):
        chosen = router.pick(replicas, "tiny")
        assert isinstance(chosen, Replica)
        picked.append(chosen.job_id)
        router.release(chosen.job_id)
    assert picked == ["a", "b", "c", "a", "b", "c"]


def test_max_streams_is_never_passed_and_busy_is_told_from_none() -> None:
    router = Router()
    a = _replica("a", max_streams=2)
    assert router.pick([a], "tiny") == a
    assert router.pick([a], "tiny") == a
    assert router.pick([a], "tiny") is Full.BUSY
    assert router.pick([a], "other") is Full.NONE
    assert router.pick([a], "tiny", exclude={"a"}) is Full.NONE


def test_a_bearer_token_is_read_from_its_header_only() -> None:
    assert bearer("Bearer gpk-abc") == "gpk-abc"
    assert bearer("bearer   gpk-abc ") == "gpk-abc"
    for bad in (None, "", "Basic Zm9vOmJhcg==", "Bearer", "Bearer " + "x" * 600, "gpk-abc"):
        assert bearer(bad) is None


def test_a_key_over_its_rate_waits_and_another_key_does_not() -> None:
    limits = RateLimits()
    assert [limits.admit("k1", 3, 100.0) for _ in range(3)] == [0.0] * 3
    wait = limits.admit("k1", 3, 100.0)
    assert wait == pytest.approx(20.0)  # one token each 20 s
    assert retry_after(wait) == "20"
    assert limits.admit("k2", 3, 100.0) == 0.0
    assert limits.admit("k1", 3, 110.0) == pytest.approx(10.0)  # nothing was taken
    assert limits.admit("k1", 3, 120.0) == 0.0
    assert retry_after(0.01) == "1"


def test_a_plain_answer_gives_its_usage() -> None:
    reader = UsageReader(stream=False)
    body = json.dumps({"usage": {"prompt_tokens": 9, "completion_tokens": 4}}).encode()
    assert not reader.feed(body[:10])
    reader.feed(body[10:])
    assert reader.finish() == Usage(9, 4)


def test_a_stream_gives_its_first_event_and_its_last_usage_or_timings() -> None:
    reader = UsageReader(stream=True)
    assert not reader.feed(b": comment\n\n")
    assert reader.feed(b'data: {"choices": [{"delta": {"content": "a"}}]}\n')
    assert not reader.feed(b'\ndata: {"choices": [], "usage": {"prompt_tokens": 2, "compl')
    reader.feed(b'etion_tokens": 3}}\n\ndata: [DONE]\n\n')
    assert (reader.finish(), reader.events) == (Usage(2, 3), 2)
    llama = UsageReader(stream=True)
    llama.feed(b'data: {"timings": {"prompt_n": 5, "predicted_n": 12}}\r\n\r\n')
    assert llama.finish() == Usage(5, 12)


def test_only_a_streams_events_that_report_usage_are_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded: list[bytes] = []
    real = usage_module._decode

    def counting(data: bytes) -> object:
        decoded.append(data)
        return real(data)

    monkeypatch.setattr(usage_module, "_decode", counting)
    reader = UsageReader(stream=True)
    token = b'data: {"choices": [{"delta": {"content": "\\"usage\\""}}], "usage": null}\n\n'
    for _ in range(1000):
        reader.feed(token)
    reader.feed(b'data: {"choices": [], "usage" : {"prompt_tokens": 2, "completion_tokens": 9}}\n')
    assert (reader.finish(), reader.events) == (Usage(2, 9), 1001)
    assert len(decoded) == 1


def test_hostile_usage_is_ignored_and_held_to_a_bound() -> None:
    reader = UsageReader(stream=True)
    reader.feed(b"data: " + b"x" * (MAX_LINE_BYTES + 10))  # a line past the bound: skipped
    reader.feed(b'"usage": {"prompt_tokens": 1}}\n')
    reader.feed(b'data: {"usage": {"prompt_tokens": true, "completion_tokens": -1}}\n')
    reader.feed(b'data: {"usage": {"prompt_tokens": 99999999999999999999}}\n')
    reader.feed(b"data: [not json\n")
    assert reader.finish() == Usage()
    plain = UsageReader(stream=False)
    plain.feed(b"{" + b" " * MAX_BODY_BYTES)
    plain.feed(b'"usage": {"prompt_tokens": 1}}')
    assert plain.finish() == Usage()


def test_a_request_body_must_name_its_model() -> None:
    assert answers.read_model(b'{"model": "tiny", "stream": true}') == answers.Asked(
        model="tiny", stream=True
    )
    assert not answers.read_model(b'{"model": "tiny", "stream": "yes"}').stream
    for bad in (b"", b"nope", b"[]", b'{"model": 1}', b'{"model": ""}', b"{}"):
        with pytest.raises(GatewayError) as refused:
            answers.read_model(bad)
        assert refused.value.code == "bad_request"


def test_every_code_has_openais_error_shape() -> None:
    for code, (status, kind) in answers.STATUS.items():
        got, body = answers.error_body(GatewayError(code, "why"))
        assert got == status
        assert json.loads(body) == {"error": {"message": "why", "type": kind, "code": code}}
    event = answers.error_event(GatewayError("upstream_error", "x"))
    assert event.startswith(b"data: {")
    assert event.endswith(b"\n\n")


def test_keys_are_stored_hashed_and_records_are_held_to_their_bound(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    try:
        key, text = store.api_keys.create("alice", 60, 1.0)
        assert text.startswith("gpk-")
        assert store.api_keys.find(text) == key
        assert store.api_keys.find(text + "x") is None
        dump = (tmp_path / "c.db").read_bytes() + (tmp_path / "c.db-wal").read_bytes()
        assert text.encode() not in dump
        assert hash_key(text).encode() in dump
        assert store.api_keys.revoke(key.key_id, 2.0).revoked == 2.0
        found = store.api_keys.find(text)  # it was found (and kept) before: not any more
        assert found is not None
        assert found.revoked == 2.0
        assert store.api_keys.revoke(key.key_id, 3.0).revoked == 2.0  # once
        with pytest.raises(GatewayError):
            store.api_keys.revoke("key-0000000000000000", 3.0)
        records = [request_record(n) for n in range(10)]
        store.requests.add(records[:6], keep_rows=4)
        store.requests.add(records[6:], keep_rows=4)
        assert [r.at for r in store.requests.recent(100)] == [9, 8, 7, 6]
        assert store.requests.recent(2) == [records[9], records[8]]
    finally:
        store.close()


def test_a_store_of_version_5_gets_the_gateways_tables(tmp_path: Path) -> None:
    Store(tmp_path / "c.db").close()
    db = sqlite3.connect(tmp_path / "c.db")
    db.executescript(
        "DROP TABLE api_keys; DROP TABLE gateway_requests; DROP INDEX jobs_by_state;"
        " PRAGMA user_version = 5;"
    )
    db.close()
    store = Store(tmp_path / "c.db")
    try:
        assert store.api_keys.all() == []
        store.requests.add([request_record(1)], keep_rows=10)
        assert store.services.live() == []
    finally:
        store.close()
