"""docs/control-api.md: every example line is what the types read and write."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from agent.control.wire import (
    METHODS,
    Call,
    Frame,
    JobView,
    LogChunkView,
    Refusal,
    SettingsParams,
    StatusView,
    parse_request,
)
from agent.owner.policy import OwnerPolicy, changed

DOC = Path(__file__).resolve().parents[2] / "docs" / "control-api.md"
RESULTS: dict[str, object] = {
    "status": StatusView,
    "pause": StatusView,
    "resume": StatusView,
    "jobs": list[JobView],
    "logs": JobView,
    "subscribe": None,
    "settings": OwnerPolicy,
    "set_settings": OwnerPolicy,
}
EVENTS: dict[str, object] = {"state": StatusView, "log": LogChunkView}


def _blocks() -> list[list[str]]:
    blocks = re.findall(r"```\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    return [block.splitlines() for block in blocks if block.startswith(("->", "<-"))]


def _documented_codes() -> set[str]:
    return set(re.findall(r"^\| `([a-z_]+)` +\|", DOC.read_text(encoding="utf-8"), flags=re.M))


def test_the_page_has_examples_of_every_method() -> None:
    requests = [
        parse_request(line[3:].encode()) for b in _blocks() for line in b if line[:2] == "->"
    ]
    assert {r.method for r in requests if isinstance(r, Call)} == set(METHODS)


@pytest.mark.parametrize("block", _blocks(), ids=lambda b: b[0][:40])
def test_every_example_line_decodes(block: list[str]) -> None:
    requests: dict[object, tuple[str, Call | Refusal]] = {}
    for line in block:
        direction, text = line[:2], line[3:].encode()
        if direction == "->":
            request = parse_request(text)
            requests[msgspec.json.decode(text)["id"]] = (text.decode(), request)
            continue
        assert direction == "<-", line
        frame = msgspec.json.decode(text, type=Frame)
        if frame.error is not None:
            assert frame.error.code in _documented_codes()
            if frame.id is not None:
                _, refused = requests[frame.id]
                if isinstance(refused, Call):
                    # A valid request the agent refused: the same settings are refused.
                    assert isinstance(refused.params, SettingsParams)
                    with pytest.raises(ValueError, match=frame.error.message):
                        changed(OwnerPolicy(), refused.params.changes)
                    continue
                assert (refused.code, refused.message) == (frame.error.code, frame.error.message)
        elif frame.event is not None:
            assert isinstance(frame.data, msgspec.Raw)
            msgspec.json.decode(frame.data, type=EVENTS[frame.event])
        else:
            _, call = requests[frame.id]
            assert isinstance(call, Call)
            assert isinstance(frame.result, msgspec.Raw)
            expected = RESULTS[call.method]
            if expected is None:
                assert bytes(frame.result) == b"null"
            else:
                msgspec.json.decode(frame.result, type=expected)


def test_every_server_error_code_is_documented() -> None:
    import agent.control.wire

    listed = re.findall(r"^    ([a-z_]+) {2,}", agent.control.wire.__doc__ or "", flags=re.M)
    assert len(listed) >= 15
    assert set(listed) <= _documented_codes() | {
        "socket_in_use",
        "unknown_group",
        "bad_socket_path",
        "socket_error",
    }
