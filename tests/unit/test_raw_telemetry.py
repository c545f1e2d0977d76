"""Telemetry samples are kept as the bytes received, and still checked as JSON objects."""

from __future__ import annotations

import msgspec
import pytest

from agent.protocol.errors import ProtocolError
from agent.protocol.messages import Telemetry, decode_frame


def frame(body: str) -> str:
    return '{"v":1,"type":"telemetry","seq":1,"body":' + body + "}"


def test_a_sample_is_stored_as_the_bytes_it_came_in() -> None:
    body = '{"samples":[{"taken_at":1.50,"gpus":[{"power_w":2.50e2,"name":"A\\u0035000"}]}]}'
    message = decode_frame(frame(body))
    assert isinstance(message, Telemetry)
    # Not rebuilt as Python objects: 1.50 and the escape come back as they were sent.
    assert msgspec.json.encode(message.body).decode() == body[:-1] + ',"dropped":0}'


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ('{"samples":[1]}', "bad_message"),
        ('{"samples":[{"gpus":[1,]}]}', "bad_json"),
        ('{"samples":[{"gpus":tru}]}', "bad_json"),
        ('{"samples":[{"t":"\\ud800x"}]}', "bad_json"),
        ('{"samples":[{"t":1}],"extra":0}', "bad_message"),
        ('{"samples":[{"t":1}],"dropped":-1}', "bad_message"),
    ],
)
def test_a_malformed_sample_is_refused_with_its_code(body: str, code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_frame(frame(body))
    assert caught.value.code == code
