"""oci's own reference parser agrees with sandbox.spec.ImageRef (oci may not import it)."""

from __future__ import annotations

import pytest

from oci import OciError, parse_reference
from sandbox.spec import ImageRef

D = "sha256:" + "ab" * 32

# Accepted by both, normalised the same way.
SAME = [
    "python",
    "python:3.12-slim",
    "library/python",
    "docker.io/python",
    "index.docker.io/library/python:3",
    "user/app:v1",
    "ghcr.io/org/team/app:1.0",
    "localhost/app",
    "localhost:5000/app:tag",
    "127.0.0.1:5000/test/busybox:1",
    "registry.example.com/models/llm@" + D,
    "registry.example.com/models/llm:v2@" + D,
    "a.b-c.d:443/x__y/z--w.v",
]
# Refused by both.
BAD = [
    "",
    "Python",
    "python:",
    "python:-x",
    "python@sha256:abc",
    "python@sha512:" + "ab" * 64,
    "-bad.example.com/x",
    "bad_host.com/x",
    "/python",
    "python/",
    "a//b",
    "ab" * 32,
    "x" * 256,
    "a.b/z-.-w",
]


@pytest.mark.parametrize("text", SAME)
def test_oci_normalises_a_reference_as_the_sandbox_does(text: str) -> None:
    ours, theirs = parse_reference(text), ImageRef.parse(text)
    assert (ours.repository, ours.tag, ours.digest) == (
        theirs.repository,
        theirs.tag,
        theirs.digest,
    )


@pytest.mark.parametrize("text", BAD)
def test_oci_refuses_what_the_sandbox_refuses(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the sandbox's own error type
        ImageRef.parse(text)
    with pytest.raises(OciError) as caught:
        parse_reference(text)
    assert caught.value.code == "bad_reference"


@pytest.mark.parametrize("text", [D, "sha256:v1"])
def test_an_image_id_is_no_registry_reference(text: str) -> None:
    """The sandbox reads "sha256:..." as a local id; no registry serves one: refused."""
    with pytest.raises(OciError) as caught:
        parse_reference(text)
    assert caught.value.code == "bad_reference"


def test_the_sandbox_takes_a_local_id_that_oci_refuses() -> None:
    assert ImageRef.parse(D).repository is None


def test_docker_hub_is_reached_at_its_api_host() -> None:
    ref = parse_reference("python:3")
    assert (ref.registry, ref.path, ref.api_host, ref.target) == (
        "docker.io",
        "library/python",
        "registry-1.docker.io",
        "3",
    )
    assert parse_reference("127.0.0.1:5000/a/b").api_host == "127.0.0.1:5000"
    assert parse_reference("a/b").target == "latest"
    assert parse_reference(f"a/b:t@{D}").target == D
