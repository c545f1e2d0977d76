"""A registry that lies: wrong digests and sizes, stalls, endless bodies, 401 forever, 500.

Served over TLS (the same kind of CA as the real one) by a threaded http.server; each
repository name picks one misbehaviour. "bearer" is an honest one behind a token endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from support.tls import make_server_tls

__all__ = ["CONFIG", "MANIFEST", "HostileRegistry", "running_hostile_registry"]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG = json.dumps({"os": "linux", "architecture": "amd64"}).encode()
_LAYER = b"not really a layer"


def _descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {
        "mediaType": media_type,
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": _descriptor("application/vnd.docker.container.image.v1+json", CONFIG),
        "layers": [_descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip", _LAYER)],
    }
).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
CONFIG_DIGEST = "sha256:" + hashlib.sha256(CONFIG).hexdigest()
TOKEN = "good-token"
LOGIN = ("hostile-user", "hostile-secret")


@dataclass
class HostileRegistry:
    """Where it answers, the CA to trust, and the event that ends every stall."""

    host: str
    ca_file: Path
    release: threading.Event = field(default_factory=threading.Event)
    requests: int = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests read codes, not logs."""

    def do_GET(self) -> None:
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            # The client hung up on an endless or stalled body: that was the point.
            self.close_connection = True

    def _route(self) -> None:
        self.server.registry.requests += 1
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[0] == "token":
            self._token()
            return
        if parts[0] == "blobstore" and parts[-1] == CONFIG_DIGEST:
            self._send(200, CONFIG)
            return
        if len(parts) != 4 or parts[0] != "v2":
            self._send(401, b"{}")  # the refusing token endpoint, and anything unknown
            return
        name, kind, ref = parts[1], parts[2], parts[3]
        host = self.server.registry.host
        if name == "bearer":
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                realm = f'Bearer realm="https://{host}/token",service="hostile"'
                self._send(401, b"{}", {"WWW-Authenticate": realm})
            elif kind == "blobs" and ref == CONFIG_DIGEST:
                self._send(200, CONFIG)
            else:
                self._manifest(MANIFEST)
        elif name == "bearer-refused":
            realm = f'Bearer realm="https://{host}/token-refused",service="hostile"'
            self._send(401, b"{}", {"WWW-Authenticate": realm})
        elif name == "unauthorized":
            self._send(401, b"{}", {"WWW-Authenticate": 'Basic realm="hostile"'})
        elif name == "error500":
            self._send(500, b"{}")
        elif name == "lying-header":
            wrong = "sha256:" + hashlib.sha256(b"another manifest").hexdigest()
            self._manifest(MANIFEST, {"Docker-Content-Digest": wrong})
        elif name == "lying-body":
            # Whatever digest is asked for, the same bytes come back.
            self._manifest(MANIFEST)
        elif name == "wrong-size":
            if ref.startswith("sha256:"):
                self._manifest(MANIFEST)
            else:
                entry = {
                    "mediaType": DOCKER_MANIFEST,
                    "digest": MANIFEST_DIGEST,
                    "size": len(MANIFEST) + 1,
                    "platform": {"os": "linux", "architecture": "amd64"},
                }
                index = {"schemaVersion": 2, "manifests": [entry]}
                self._manifest(
                    json.dumps(index).encode(),
                    content_type="application/vnd.oci.image.index.v1+json",
                )
        elif name == "redirect":
            # Blobs live elsewhere, as on registries backed by an object store (a relative URL).
            if kind == "blobs":
                self._send(307, b"", {"Location": f"/blobstore/{ref}"})
            else:
                self._manifest(MANIFEST)
        elif name == "redirect-http":
            if kind == "blobs":
                self._send(307, b"", {"Location": f"http://{host}/blobstore/{ref}"})
            else:
                self._manifest(MANIFEST)
        elif name == "redirect-bad-port":
            if kind == "blobs":
                self._send(307, b"", {"Location": "https://127.0.0.1:99999/blobstore/x"})
            else:
                self._manifest(MANIFEST)
        elif name == "drip":
            # Never stalls long enough for the stall bound: only the deadline stops it.
            self._head(200, {"Content-Length": str(len(MANIFEST))})
            for byte in MANIFEST:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if self.server.registry.release.wait(0.05):
                    break
        elif name == "huge":
            self._head(200, {"Content-Length": str(64 * 1024 * 1024)})
        elif name == "short":
            self._head(200, {"Content-Length": str(len(MANIFEST))})
            self.wfile.write(MANIFEST[:10])
        elif name == "stall":
            self._head(200, {"Content-Length": str(len(MANIFEST))})
            self.wfile.write(MANIFEST[:10])
            self.wfile.flush()
            self.server.registry.release.wait()
        elif name == "endless":
            self._head(200, {"Content-Type": DOCKER_MANIFEST})
            while not self.server.registry.release.is_set():
                self.wfile.write(b" " * 65536)
        elif name == "garbage":
            self._manifest(b"<html>surely not a manifest</html>")
        elif name == "schema1":
            body = json.dumps(
                {
                    "schemaVersion": 1,
                    "mediaType": "application/vnd.docker.distribution.manifest.v1+prettyjws",
                }
            ).encode()
            self._manifest(body)
        else:
            self._send(404, b"{}")

    def _token(self) -> None:
        pair = base64.b64encode(":".join(LOGIN).encode()).decode()
        if self.path.startswith("/token?") and self.headers.get("Authorization") == f"Basic {pair}":
            self._send(200, json.dumps({"token": TOKEN}).encode())
        else:
            self._send(401, b"{}")

    def _manifest(
        self,
        body: bytes,
        headers: dict[str, str] | None = None,
        content_type: str = DOCKER_MANIFEST,
    ) -> None:
        self._send(200, body, {"Content-Type": content_type, **(headers or {})})

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self._head(status, {"Content-Length": str(len(body)), **(headers or {})})
        self.wfile.write(body)

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()


class _Server(http.server.ThreadingHTTPServer):
    # Joined at close, so no handler thread outlives the test (stalls are released first).
    daemon_threads = False
    block_on_close = True
    registry: HostileRegistry


@contextmanager
def running_hostile_registry(workdir: Path) -> Iterator[HostileRegistry]:
    """The hostile registry on 127.0.0.1:<free port>, over TLS from its own CA."""
    tls = make_server_tls(workdir)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    server = _Server(("127.0.0.1", 0), _Handler)
    # The handshake happens in the handler's thread, not in the one that accepts.
    server.socket = context.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    server.registry = HostileRegistry(f"127.0.0.1:{server.server_address[1]}", tls.ca_file)
    thread = threading.Thread(target=server.serve_forever, name="hostile-registry")
    thread.start()
    try:
        yield server.registry
    finally:
        server.registry.release.set()
        server.shutdown()
        thread.join()
        server.server_close()
