"""The oci library against Debian's real registry, and against a hostile one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from support.hostile_registry import (
    LOGIN,
    MANIFEST_DIGEST,
    HostileRegistry,
    running_hostile_registry,
)
from support.images import build_busybox_image
from support.registry import (
    DOCKER_MANIFEST,
    LocalRegistry,
    RegistryApi,
    running_registry,
    sign_image,
)

from oci import (
    Credentials,
    ImagePolicy,
    OciError,
    RegistryClient,
    resolve,
    resolve_allowed,
    verify_signature,
)

PATH = "test/busybox"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


@dataclass(frozen=True)
class Pushed:
    """What the module's registry holds: an image, an index of two, and their digests."""

    registry: LocalRegistry
    api: RegistryApi
    digest: str
    size: int
    arm_digest: str
    arm_size: int
    key: ec.EllipticCurvePrivateKey

    @property
    def repository(self) -> str:
        return f"{self.registry.host}/{PATH}"

    def client(self, password: str | None = None) -> RegistryClient:
        login = Credentials(self.registry.username, password or self.registry.password)
        return _opened(
            RegistryClient(credentials={self.registry.host: login}, ca_file=self.registry.ca_file)
        )


_OPEN: list[RegistryClient] = []


def _opened(client: RegistryClient) -> RegistryClient:
    """Close ``client`` after the test (its kept-alive connections would leak)."""
    _OPEN.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    if shutil.which("docker-registry") is None or shutil.which("htpasswd") is None:
        reason = "docker-registry or htpasswd (apache2-utils) is not installed"
        if os.environ.get("GPU_AGENT_REQUIRE_DOCKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    with running_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture(scope="module")
def pushed(
    registry: LocalRegistry, docker_engine: str, tmp_path_factory: pytest.TempPathFactory
) -> Pushed:
    """busybox pushed by the docker CLI, then an index and a signature through the API."""
    tag = f"{registry.host}/{PATH}:1"
    build_busybox_image(tag, tmp_path_factory.mktemp("context"))
    # A config of its own, so the test's login never lands in the user's ~/.docker.
    docker = ["docker", "--config", str(tmp_path_factory.mktemp("docker-config"))]
    try:
        subprocess.run(
            [*docker, "login", registry.host, "-u", registry.username, "--password-stdin"],
            input=registry.password.encode(),
            capture_output=True,
            check=True,
        )
        push = subprocess.run([*docker, "push", tag], capture_output=True, text=True, check=True)
    finally:
        subprocess.run(["docker", "rmi", tag], capture_output=True, check=False)
    api = RegistryApi(registry)
    body = api.manifest(PATH, "1")
    manifest = json.loads(body)
    size = manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])
    # An arm64 twin: the same layers under a config that says arm64/v8.
    config = json.loads(api.request("GET", f"/v2/{PATH}/blobs/{manifest['config']['digest']}")[0])
    config |= {"architecture": "arm64", "variant": "v8"}
    arm_config = api.push_blob(PATH, json.dumps(config).encode())
    arm = manifest | {"config": manifest["config"] | arm_config}
    arm_body = json.dumps(arm).encode()
    arm_digest = "sha256:" + hashlib.sha256(arm_body).hexdigest()
    api.push_manifest(PATH, arm_digest, arm_body, DOCKER_MANIFEST)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    # What the engine reports is what oci must find: "1: digest: sha256:... size: N".
    assert f"digest: {digest} " in push.stdout
    entries = [
        (digest, len(body), {"os": "linux", "architecture": "amd64"}),
        (arm_digest, len(arm_body), {"os": "linux", "architecture": "arm64", "variant": "v8"}),
    ]
    for index_tag, media_type in (("multi", DOCKER_LIST), ("multi-oci", OCI_INDEX)):
        index = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {"mediaType": DOCKER_MANIFEST, "digest": d, "size": n, "platform": p}
                for d, n, p in entries
            ],
        }
        api.push_manifest(PATH, index_tag, json.dumps(index).encode(), media_type)
    key = ec.generate_private_key(ec.SECP256R1())
    sign_image(api, PATH, digest, key)
    arm_size = size - manifest["config"]["size"] + arm_config["size"]
    return Pushed(registry, api, digest, size, arm_digest, arm_size, key)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileRegistry]:
    with running_hostile_registry(tmp_path_factory.mktemp("hostile")) as running:
        yield running


def _code(call: object) -> str:
    assert callable(call)
    with pytest.raises(OciError) as caught:
        call()
    return caught.value.code


# ------------------------------------------------------------------ resolving


def test_a_tag_resolves_to_the_manifest_docker_pushed(pushed: Pushed) -> None:
    resolved = resolve(pushed.client(), f"{pushed.repository}:1")
    assert resolved.digest == pushed.digest
    assert resolved.size_compressed == pushed.size
    assert resolved.media_type == DOCKER_MANIFEST
    assert resolved.pinned == f"{pushed.repository}@{pushed.digest}"


def test_a_warm_client_resolves_a_tag_in_two_requests(pushed: Pushed) -> None:
    """The login is kept: no 401 round trip once the client has authenticated."""
    client, reference = pushed.client(), f"{pushed.repository}:1"
    config = json.loads(pushed.api.manifest(PATH, "1"))["config"]["digest"]
    resolve(client, reference)
    before = len(pushed.registry.requests())
    resolve(client, reference)
    assert pushed.registry.requests()[before:] == [
        ("GET", f"/v2/{PATH}/manifests/1", 200),
        ("GET", f"/v2/{PATH}/blobs/{config}", 200),
    ]


def test_a_digest_resolves_to_itself(pushed: Pushed) -> None:
    resolved = resolve(pushed.client(), f"{pushed.repository}@{pushed.digest}")
    assert resolved.digest == pushed.digest


@pytest.mark.parametrize("tag", ["multi", "multi-oci"])
def test_an_index_resolves_to_the_platforms_manifest(pushed: Pushed, tag: str) -> None:
    client = pushed.client()
    assert resolve(client, f"{pushed.repository}:{tag}").digest == pushed.digest
    arm = resolve(client, f"{pushed.repository}:{tag}", "linux/arm64/v8")
    assert arm.digest == pushed.arm_digest
    assert arm.size_compressed == pushed.arm_size
    assert resolve(client, f"{pushed.repository}:{tag}", "linux/arm64").digest == arm.digest


@pytest.mark.parametrize(("tag", "platform"), [("multi", "linux/s390x"), ("1", "linux/arm64")])
def test_an_image_for_another_platform_is_refused(pushed: Pushed, tag: str, platform: str) -> None:
    code = _code(lambda: resolve(pushed.client(), f"{pushed.repository}:{tag}", platform))
    assert code == "no_matching_platform"


@pytest.mark.parametrize("reference", ["test/busybox:nope", "test/nothing:1"])
def test_an_unknown_tag_or_repository_is_not_found(pushed: Pushed, reference: str) -> None:
    code = _code(lambda: resolve(pushed.client(), f"{pushed.registry.host}/{reference}"))
    assert code == "image_not_found"


def test_a_wrong_password_or_none_is_refused(pushed: Pushed) -> None:
    reference = f"{pushed.repository}:1"
    with pytest.raises(OciError) as caught:
        resolve(pushed.client("wrong-password-0123"), reference)
    assert caught.value.code == "registry_auth_failed"
    assert "wrong-password-0123" not in repr(caught.value)
    assert "wrong-password-0123" not in repr(pushed.client("wrong-password-0123").__dict__)
    anonymous = _opened(RegistryClient(ca_file=pushed.registry.ca_file))
    assert _code(lambda: resolve(anonymous, reference)) == "registry_auth_failed"


def test_a_registry_whose_ca_is_not_trusted_is_unreachable(pushed: Pushed) -> None:
    client = _opened(RegistryClient(credentials={pushed.registry.host: Credentials("a", "b")}))
    code = _code(lambda: resolve(client, f"{pushed.repository}:1"))
    assert code == "registry_unreachable"


def test_the_policy_caps_the_size_and_names_the_registries(pushed: Pushed) -> None:
    client, reference = pushed.client(), f"{pushed.repository}:1"
    allow = (f"{pushed.registry.host}/test/*",)
    fits = ImagePolicy(allow=allow, max_compressed_bytes=pushed.size)
    assert resolve_allowed(client, fits, reference).digest == pushed.digest
    small = ImagePolicy(allow=allow, max_compressed_bytes=pushed.size - 1)
    assert _code(lambda: resolve_allowed(client, small, reference)) == "image_too_large"
    other = ImagePolicy(allow=(f"{pushed.registry.host}/models/*",))
    assert _code(lambda: resolve_allowed(client, other, reference)) == "registry_not_allowed"


# ------------------------------------------------------------------ signatures


def test_a_signed_image_passes_with_its_key(pushed: Pushed) -> None:
    client = pushed.client()
    verify_signature(client, pushed.repository, pushed.digest, [pushed.key.public_key()])
    policy = ImagePolicy(allow=(f"{pushed.registry.host}/*",), keys=(pushed.key.public_key(),))
    assert resolve_allowed(client, policy, f"{pushed.repository}:1").digest == pushed.digest


def test_an_ed25519_signature_verifies(pushed: Pushed) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    sign_image(pushed.api, PATH, pushed.arm_digest, key)
    verify_signature(pushed.client(), pushed.repository, pushed.arm_digest, [key.public_key()])


def test_an_unsigned_image_has_its_signature_missing(pushed: Pushed) -> None:
    client, key = pushed.client(), pushed.key.public_key()
    digest = "sha256:" + "0" * 64
    assert _code(lambda: verify_signature(client, pushed.repository, digest, [key])) == (
        "signature_missing"
    )


def test_a_signature_under_another_key_is_invalid(pushed: Pushed) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    client = pushed.client()
    code = _code(lambda: verify_signature(client, pushed.repository, pushed.digest, [other]))
    assert code == "signature_invalid"
    policy = ImagePolicy(allow=(f"{pushed.registry.host}/*",), keys=(other,))
    reference = f"{pushed.repository}:1"
    assert _code(lambda: resolve_allowed(client, policy, reference)) == "signature_invalid"


@pytest.mark.parametrize("lie", ["digest", "repository"])
def test_a_signature_of_another_image_is_invalid(pushed: Pushed, lie: str) -> None:
    """A genuine signature, made for another digest or repository, pushed under this one."""
    subject = "sha256:" + hashlib.sha256(lie.encode()).hexdigest()
    sign_image(
        pushed.api,
        PATH,
        subject,
        pushed.key,
        claimed_digest="sha256:" + "1" * 64 if lie == "digest" else None,
        claimed_repository=f"{pushed.registry.host}/other" if lie == "repository" else None,
    )
    client, key = pushed.client(), pushed.key.public_key()
    code = _code(lambda: verify_signature(client, pushed.repository, subject, [key]))
    assert code == "signature_invalid"


@pytest.mark.parametrize(
    ("media_type", "annotation"),
    [
        ("application/vnd.dev.cosign.simplesigning.v1+json", "not base64!"),
        ("application/vnd.oci.image.layer.v1.tar", None),
    ],
)
def test_a_signature_artifact_without_a_usable_signature_is_invalid(
    pushed: Pushed, media_type: str, annotation: str | None
) -> None:
    subject = "sha256:" + hashlib.sha256(media_type.encode()).hexdigest()
    layer = pushed.api.push_blob(PATH, b"{}")
    config = pushed.api.push_blob(PATH, b"{}")
    annotations = {"dev.cosignproject.cosign/signature": annotation} if annotation else {}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": media_type, **layer, "annotations": annotations}],
    }
    pushed.api.push_manifest(
        PATH,
        subject.replace(":", "-") + ".sig",
        json.dumps(manifest).encode(),
        "application/vnd.oci.image.manifest.v1+json",
    )
    client, key = pushed.client(), pushed.key.public_key()
    code = _code(lambda: verify_signature(client, pushed.repository, subject, [key]))
    assert code == "signature_invalid"


# ------------------------------------------------------------------ a hostile registry


def _hostile(hostile: HostileRegistry, stall: float = 30.0) -> RegistryClient:
    login = Credentials(*LOGIN)
    return _opened(
        RegistryClient(credentials={hostile.host: login}, ca_file=hostile.ca_file, stall=stall)
    )


def test_a_bearer_token_registry_is_resolved_through_its_token_endpoint(
    hostile: HostileRegistry,
) -> None:
    resolved = resolve(_hostile(hostile), f"{hostile.host}/bearer:1")
    assert resolved.digest == MANIFEST_DIGEST


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("lying-header:1", "digest_mismatch"),
        (f"lying-body@sha256:{'2' * 64}", "digest_mismatch"),
        ("wrong-size:1", "digest_mismatch"),
        ("huge:1", "manifest_too_large"),
        ("endless:1", "manifest_too_large"),
        ("short:1", "registry_unreachable"),
        ("unauthorized:1", "registry_auth_failed"),
        ("bearer-refused:1", "registry_auth_failed"),
        ("error500:1", "registry_unreachable"),
        ("garbage:1", "bad_manifest"),
        ("schema1:1", "unsupported_media_type"),
        ("missing:1", "image_not_found"),
        ("redirect-http:1", "registry_unreachable"),
        ("redirect-bad-port:1", "registry_unreachable"),
    ],
)
def test_a_hostile_registry_gets_a_coded_refusal(
    hostile: HostileRegistry, name: str, code: str
) -> None:
    assert _code(lambda: resolve(_hostile(hostile), f"{hostile.host}/{name}")) == code


def test_a_blob_redirected_to_a_store_is_followed(hostile: HostileRegistry) -> None:
    assert resolve(_hostile(hostile), f"{hostile.host}/redirect:1").digest == MANIFEST_DIGEST


def test_a_refused_registry_is_never_asked(hostile: HostileRegistry) -> None:
    policy = ImagePolicy(allow=("registry.example.com/*",))
    before = hostile.requests
    reference = f"{hostile.host}/bearer:1"
    assert _code(lambda: resolve_allowed(_hostile(hostile), policy, reference)) == (
        "registry_not_allowed"
    )
    assert hostile.requests == before


def test_a_registry_that_drips_is_cut_off_at_the_deadline(hostile: HostileRegistry) -> None:
    client = _opened(RegistryClient(ca_file=hostile.ca_file, stall=30.0, deadline=0.5))
    assert _code(lambda: resolve(client, f"{hostile.host}/drip:1")) == "pull_timeout"


def test_a_bearer_registry_without_a_login_is_refused(hostile: HostileRegistry) -> None:
    anonymous = _opened(RegistryClient(ca_file=hostile.ca_file))
    code = _code(lambda: resolve(anonymous, f"{hostile.host}/bearer:1"))
    assert code == "registry_auth_failed"


def test_a_registry_that_stalls_mid_body_times_out(hostile: HostileRegistry) -> None:
    client = _hostile(hostile, stall=0.5)
    assert _code(lambda: resolve(client, f"{hostile.host}/stall:1")) == "pull_timeout"


def test_a_closed_port_is_unreachable() -> None:
    client = _opened(RegistryClient())
    assert _code(lambda: resolve(client, "127.0.0.1:1/x:1")) == "registry_unreachable"
