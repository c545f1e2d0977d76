"""Debian's real ``docker-registry`` (distribution 2.8) on 127.0.0.1, with TLS and a login.

``running_registry`` starts it on a free port with a CA of its own and htpasswd (bcrypt)
auth, and makes the engine trust it (``/etc/docker/certs.d/127.0.0.1:PORT/ca.crt``, removed
after). ``RegistryApi`` pushes blobs and manifests through the HTTP API, for what the docker
CLI cannot push (an index assembled by hand, a cosign-style signature).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from support.processes import free_port
from support.tls import make_server_tls

__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_MANIFEST",
    "LocalRegistry",
    "RegistryApi",
    "build_busybox",
    "docker_push",
    "push_busybox",
    "running_registry",
    "sign_image",
]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
CERTS_D = Path("/etc/docker/certs.d")


_ACCESS = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" ([0-9]{3}) ')


@dataclass(frozen=True)
class LocalRegistry:
    """Where the registry answers, the CA that signed it, its one login, and its log."""

    host: str
    ca_file: Path
    username: str
    password: str
    log_file: Path

    def requests(self) -> list[tuple[str, str, int]]:
        """Every request answered so far, as (method, path, status), from the access log.

        The log is written just after each answer, so a marker request of our own is sent
        and waited for: what the caller sent before it is then in the log.
        """
        marker = f"/v2/?marker={uuid.uuid4().hex}"
        context = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            urllib.request.urlopen(f"https://{self.host}{marker}", context=context, timeout=10)
        except urllib.error.HTTPError as error:
            error.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            entries = _ACCESS.findall(self.log_file.read_text(errors="replace"))
            if any(path == marker for _, path, _ in entries):
                return [
                    (method, path, int(status))
                    for method, path, status in entries
                    if "?marker=" not in path
                ]
            time.sleep(0.02)
        raise RuntimeError("the registry did not log the marker request")


@contextmanager
def running_registry(workdir: Path) -> Iterator[LocalRegistry]:
    """A registry on 127.0.0.1:<free port>, stopped and its engine trust removed after."""
    tls = make_server_tls(workdir)
    port = free_port()
    host = f"127.0.0.1:{port}"
    username, password = "tester", "registry-secret-0123"
    htpasswd = workdir / "htpasswd"
    with htpasswd.open("wb") as out:
        subprocess.run(["htpasswd", "-Bbn", username, password], stdout=out, check=True)
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "data")}},
        "http": {
            "addr": host,
            "secret": "test-only",
            "tls": {"certificate": str(tls.cert_file), "key": str(tls.key_file)},
        },
        "auth": {"htpasswd": {"realm": "oci-tests", "path": str(htpasswd)}},
    }
    # JSON is YAML, which is what the registry reads.
    (workdir / "config.yml").write_text(json.dumps(config))
    trust = CERTS_D / host
    trust.mkdir(parents=True, exist_ok=True)
    shutil.copy(tls.ca_file, trust / "ca.crt")
    log = (workdir / "registry.log").open("wb")
    process = subprocess.Popen(
        ["docker-registry", "serve", str(workdir / "config.yml")], stdout=log, stderr=log
    )
    try:
        registry = LocalRegistry(host, tls.ca_file, username, password, workdir / "registry.log")
        _wait_until_up(registry, process)
        yield registry
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        shutil.rmtree(trust)


def _wait_until_up(registry: LocalRegistry, process: subprocess.Popen[bytes]) -> None:
    """Poll /v2/ until the registry answers (it has no readiness signal of its own)."""
    context = ssl.create_default_context(cafile=str(registry.ca_file))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {process.returncode}")
        try:
            urllib.request.urlopen(f"https://{registry.host}/v2/", context=context, timeout=5)
        except urllib.error.HTTPError as error:
            if error.code == 401:
                error.close()
                return
            error.close()
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("docker-registry did not answer within 30 s")


class RegistryApi:
    """Pushes through the Distribution API as the registry's login."""

    def __init__(self, registry: LocalRegistry) -> None:
        self.registry = registry
        self._context = ssl.create_default_context(cafile=str(registry.ca_file))
        pair = f"{registry.username}:{registry.password}".encode()
        self._auth = "Basic " + base64.b64encode(pair).decode()

    def request(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        """One request; its body and headers (HTTP errors raise)."""
        url = urljoin(f"https://{self.registry.host}/", url)
        request = urllib.request.Request(url, data=body, method=method)
        request.add_header("Authorization", self._auth)
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        with urllib.request.urlopen(request, context=self._context, timeout=30) as response:
            return response.read(), dict(response.headers)

    def push_blob(self, path: str, data: bytes) -> dict[str, Any]:
        """Upload ``data`` to repository ``path``; its descriptor (without media type)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        _, headers = self.request("POST", f"/v2/{path}/blobs/uploads/", b"")
        location = headers["Location"]
        joiner = "&" if "?" in location else "?"
        self.request(
            "PUT",
            f"{location}{joiner}digest={digest}",
            data,
            {"Content-Type": "application/octet-stream"},
        )
        return {"digest": digest, "size": len(data)}

    def push_manifest(self, path: str, reference: str, body: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or its digest; its digest."""
        self.request("PUT", f"/v2/{path}/manifests/{reference}", body, {"Content-Type": media_type})
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def manifest(self, path: str, reference: str) -> bytes:
        """GET a manifest as pushed (a Docker v2 one)."""
        body, _ = self.request(
            "GET", f"/v2/{path}/manifests/{reference}", headers={"Accept": DOCKER_MANIFEST}
        )
        return body


def sign_image(
    api: RegistryApi,
    path: str,
    digest: str,
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    *,
    claimed_digest: str | None = None,
    claimed_repository: str | None = None,
) -> None:
    """Push a cosign-style signature of ``path@digest`` (its claims overridable, to lie)."""
    payload = json.dumps(
        {
            "critical": {
                "identity": {
                    "docker-reference": claimed_repository or f"{api.registry.host}/{path}"
                },
                "image": {"docker-manifest-digest": claimed_digest or digest},
                "type": "cosign container image signature",
            },
            "optional": None,
        }
    ).encode()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(payload)
    else:
        signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    layer = api.push_blob(path, payload)
    config = api.push_blob(path, b"{}")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [
            {
                "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                **layer,
                "annotations": {
                    "dev.cosignproject.cosign/signature": base64.b64encode(signature).decode()
                },
            }
        ],
    }
    tag = digest.replace(":", "-") + ".sig"
    api.push_manifest(
        path, tag, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"
    )


def docker_push(registry: LocalRegistry, tag: str, docker_config: Path) -> str:
    """Log in and push ``tag`` (an image the engine has, named in ``registry``) with the
    docker CLI, under a config directory of the test's own (the user's ~/.docker is not
    touched), then drop the local tag; return ``repository@sha256:...`` as pushed."""
    docker = ["docker", "--config", str(docker_config)]
    try:
        subprocess.run(
            [*docker, "login", registry.host, "-u", registry.username, "--password-stdin"],
            input=registry.password.encode(),
            capture_output=True,
            check=True,
        )
        pushed = subprocess.run([*docker, "push", tag], capture_output=True, text=True, check=True)
    finally:
        subprocess.run(["docker", "image", "rm", "--force", tag], capture_output=True, check=False)
    digest = re.search(r"digest: (sha256:[0-9a-f]{64}) ", pushed.stdout)
    assert digest is not None, pushed.stdout
    return f"{tag.rsplit(':', 1)[0]}@{digest.group(1)}"


def build_busybox(tag: str, context: Path, blob: bytes) -> None:
    """Build ``tag`` in the empty directory ``context``: FROM scratch, the static busybox
    (with ``sh`` and ``cat``), and ``blob`` at ``/blob``, a layer no other image shares."""
    (context / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", context / "bin" / "busybox")
    for applet in ("sh", "cat"):
        (context / "bin" / applet).symlink_to("busybox")
    (context / "blob").write_bytes(blob)
    (context / "Dockerfile").write_text("FROM scratch\nCOPY bin /bin\nCOPY blob /blob\n")
    subprocess.run(["docker", "build", "-q", "-t", tag, str(context)], check=True)


def push_busybox(registry: LocalRegistry, tag: str, blob: bytes, workdir: Path) -> str:
    """:func:`build_busybox` under ``workdir``, pushed to ``registry`` (and the local tag
    dropped): ``repository@sha256:...`` as pushed."""
    context = workdir / f"context-{uuid.uuid4().hex[:8]}"
    build_busybox(tag, context, blob)
    return docker_push(registry, tag, workdir / "docker-config")
