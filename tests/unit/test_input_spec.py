"""Inputs given by URL in the spec, and the policy that admits them."""

from __future__ import annotations

import msgspec
import pytest

from sandbox.errors import SpecError
from sandbox.policy import Policy, check
from sandbox.spec import InputFile, load_spec
from sandbox.urls import host_allowed

HEX = "ab" * 32


def _spec(item: str) -> bytes:
    return f'image = "python"\n[[inputs]]\npath = "model.bin"\n{item}\n'.encode()


def test_an_input_by_url_takes_its_digest_and_size() -> None:
    spec = load_spec(
        _spec(f'url = "https://h.example/m?x=1"\nsha256 = "{HEX}"\nsize_bytes = "2GiB"'), "toml"
    )
    assert spec.inputs == [
        InputFile(path="model.bin", url="https://h.example/m?x=1", sha256=HEX, size_bytes=2 << 30)
    ]
    assert spec.inputs[0].inline_bytes == 0


@pytest.mark.parametrize(
    ("item", "code", "field"),
    [
        (
            f'content = "x"\nurl = "https://h/m"\nsha256 = "{HEX}"\nsize_bytes = 1',
            "bad_value",
            "inputs[0]",
        ),
        ('url = "https://h/m"\nsize_bytes = 1', "missing_field", "inputs[0].sha256"),
        (f'url = "https://h/m"\nsha256 = "{HEX}"', "missing_field", "inputs[0].size_bytes"),
        ("mode = 0o444", "missing_field", "inputs[0].content"),
        (f'content = "x"\nsha256 = "{HEX}"', "bad_value", "inputs[0].sha256"),
        ('content = "x"\nsize_bytes = 1', "bad_value", "inputs[0].size_bytes"),
        (
            f'url = "https://h/m"\nsha256 = "{HEX.upper()}"\nsize_bytes = 1',
            "bad_value",
            "inputs[0].sha256",
        ),
        (
            f'url = "https://h/m"\nsha256 = "{HEX[:-1]}"\nsize_bytes = 1',
            "bad_value",
            "inputs[0].sha256",
        ),
        (
            f'url = "https://h/m"\nsha256 = "{HEX}"\nsize_bytes = 0',
            "bad_value",
            "inputs[0].size_bytes",
        ),
        (
            f'url = "https://h/m"\nsha256 = "{HEX}"\nsize_bytes = -5',
            "bad_value",
            "inputs[0].size_bytes",
        ),
        (
            f'url = "https://h/m"\nsha256 = "{HEX}"\nsize_bytes = "1m"',
            "bad_value",
            "inputs[0].size_bytes",
        ),
        (
            f'url = "https://h/m"\nsha256 = "{HEX}"\nsize_bytes = 1\nmode = 0o777',
            "bad_value",
            "inputs[0]",
        ),
    ],
)
def test_a_mixed_or_incomplete_input_is_refused_with_a_code(
    item: str, code: str, field: str
) -> None:
    with pytest.raises(SpecError) as caught:
        load_spec(_spec(item), "toml")
    assert caught.value.code == code
    assert caught.value.field == field


@pytest.mark.parametrize(
    "url",
    [
        "ftp://h.example/m",
        "file:///etc/passwd",
        "https:///nohost",
        "https://user:secret@h.example/m",
        "https://h.example/m#frag",
        "https://h.example/a b",
        "https://h.example:99999/m",
        "https://h.example/\u00e9",
        "https://h.example/" + "a" * 2100,
        "http://evil.test\\.example.org/m",
        'https://h.example/"m',
        "https://-h.example/m",
        "https://h.example%2eevil.test/m",
    ],
)
def test_an_input_url_that_is_not_plain_https_or_http_is_refused(url: str) -> None:
    item = {"path": "m", "url": url, "sha256": HEX, "size_bytes": 1}
    with pytest.raises(SpecError) as caught:
        load_spec(msgspec.json.encode({"image": "python", "inputs": [item]}), "json")
    assert (caught.value.code, caught.value.field) == ("bad_value", "inputs[0].url")


def test_an_http_url_is_allowed_since_the_digest_protects_it() -> None:
    spec = load_spec(_spec(f'url = "http://h.example/m"\nsha256 = "{HEX}"\nsize_bytes = 1'), "toml")
    assert spec.inputs[0].url == "http://h.example/m"


def _url_spec(url: str, size: int = 10) -> bytes:
    return _spec(f'url = "{url}"\nsha256 = "{HEX}"\nsize_bytes = {size}')


def test_the_policy_admits_an_input_only_from_an_allowed_host_and_under_its_cap() -> None:
    policy = Policy(
        allowed_images=["python"], allowed_input_hosts=["*.example.org"], max_url_input_bytes=100
    )
    assert check(load_spec(_url_spec("https://cdn.example.org/m"), "toml"), policy) == []
    codes = [
        v.code for v in check(load_spec(_url_spec("https://evil.test/m", 101), "toml"), policy)
    ]
    assert codes == ["input_host_not_allowed", "input_over_limit"]


def test_a_fetched_input_does_not_count_towards_the_inline_total() -> None:
    policy = Policy(allowed_images=["python"], allowed_input_hosts=["h"], max_input_bytes=0)
    assert check(load_spec(_url_spec("https://h/m", 1 << 30), "toml"), policy) == []


def test_the_default_policy_fetches_from_no_host() -> None:
    codes = [
        v.code
        for v in check(
            load_spec(_url_spec("https://h/m"), "toml"), Policy(allowed_images=["python"])
        )
    ]
    assert codes == ["input_host_not_allowed"]


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://H.Example.ORG:8443/x", True),
        ("https://example.org/x", False),
        ("https://a.example.org.evil.test/x", False),
        ("https://evil.test/x?h=a.example.org", False),
        ("https://a.example.org@evil.test/x", False),
    ],
)
def test_a_host_pattern_matches_the_host_name_only(url: str, allowed: bool) -> None:
    assert host_allowed(url, ["*.example.org"]) is allowed
