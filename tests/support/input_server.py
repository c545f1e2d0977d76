"""A real HTTP server on 127.0.0.1 serving one file, and hostile variants of it.

Paths: ``/file`` (the file), ``/wrong`` (other bytes, same size), ``/more`` (the file
and more, its Content-Length saying so), ``/more-unannounced`` (the same, no length),
``/more-than-announced`` (a Content-Length of the file, then more), ``/chunked`` (the
file in chunks), ``/chunked-more`` (the file and more, in chunks), ``/early-close``
(half the file, then the connection closed), ``/chunked-early-close`` (the same, in
chunks), ``/stall`` (half the file, then nothing until the server stops), ``/endless``
(zeros for ever, no length), ``/paced`` (the file, ``piece`` bytes each time ``go``
is released), ``/to?url=U`` (302 to U), ``/status/N`` (status N).
Requests are counted per path in ``hits``. With ``tls``, the same over https.
"""

from __future__ import annotations

import hashlib
import http.server
import ssl
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from support.tls import ServerTls

__all__ = ["InputServer", "serve_input"]


class InputServer:
    """What a running server serves, and what it was asked."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.hits: Counter[str] = Counter()
        self.stop = threading.Event()
        self.stalled = threading.Event()
        """Set once ``/stall`` has sent its half."""
        self.closed = threading.Event()
        """Set each time the server has closed a connection."""
        self.go = threading.Semaphore(0)
        """Released once per piece ``/paced`` may send."""
        self.piece = 1 << 20
        self.base = ""

    def url(self, path: str) -> str:
        """The full URL of ``path`` on this server."""
        return self.base + path


def _handler(server: InputServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the tests read ``hits``."""

        def handle(self) -> None:
            try:
                super().handle()
            except (ConnectionError, ssl.SSLError):  # over https, a give-up is a TLS error
                self.close_connection = True  # the client gave up: what the tests expect

        def _head(self, status: int, length: int | None, **headers: str) -> None:
            self.send_response(status)
            if length is not None:
                self.send_header("Content-Length", str(length))
            else:
                self.send_header("Connection", "close")
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()

        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            server.hits[parts.path] += 1
            self._answer(parts, server.data)

        def _answer(self, parts: urllib.parse.SplitResult, data: bytes) -> None:
            if parts.path == "/file":
                self._head(200, len(data))
                self.wfile.write(data)
            elif parts.path == "/wrong":
                self._head(200, len(data))
                self.wfile.write(data[1:] + data[:1])  # other bytes (fast: no Python per byte)
            elif parts.path == "/more":
                self._head(200, len(data) + 1024)
                self.wfile.write(data + b"x" * 1024)
            elif parts.path == "/more-unannounced":
                self._head(200, None)
                self.wfile.write(data + b"x" * 1024)
                self.close_connection = True
            elif parts.path == "/more-than-announced":
                self._head(200, len(data))
                self.wfile.write(data + b"x" * 1024)
                self.close_connection = True
            elif parts.path in ("/chunked", "/chunked-more", "/chunked-early-close"):
                self._head(200, None, **{"Transfer-Encoding": "chunked"})
                body = data + b"x" * 1024 if parts.path == "/chunked-more" else data
                if parts.path == "/chunked-early-close":
                    body = body[: len(body) // 2]
                for at in range(0, len(body), 100_000):  # chunks over several reads
                    piece = body[at : at + 100_000]
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                if parts.path != "/chunked-early-close":
                    self.wfile.write(b"0\r\n\r\n")
                self.close_connection = True
            elif parts.path == "/early-close":
                self._head(200, len(data))
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
            elif parts.path == "/stall":
                self._head(200, len(data))
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                server.stalled.set()
                server.stop.wait()
                self.close_connection = True
            elif parts.path == "/paced":
                self._head(200, len(data))
                for at in range(0, len(data), server.piece):
                    while not server.go.acquire(timeout=0.1):
                        if server.stop.is_set():  # the test is over: give up
                            self.close_connection = True
                            return
                    self.wfile.write(data[at : at + server.piece])
                    self.wfile.flush()
            elif parts.path == "/endless":
                self._head(200, None)
                zeros = bytes(1 << 16)
                while not server.stop.is_set():
                    self.wfile.write(zeros)
                self.close_connection = True
            elif parts.path == "/to":
                target = urllib.parse.parse_qs(parts.query)["url"][0]
                self._head(302, 0, Location=target)
            elif parts.path.startswith("/status/"):
                self._head(int(parts.path.rsplit("/", 1)[1]), 0)
            else:
                self._head(404, 0)

    return Handler


@contextmanager
def serve_input(
    data: bytes, host: str = "127.0.0.1", tls: ServerTls | None = None
) -> Iterator[InputServer]:
    """Serve ``data`` (and the hostile variants) on ``host``, a free port, in a thread;
    over https with ``tls``'s certificate if given."""
    state = InputServer(data)

    class Server(http.server.ThreadingHTTPServer):
        def shutdown_request(self, request: Any) -> None:
            super().shutdown_request(request)
            state.closed.set()

    httpd = Server((host, 0), _handler(state))
    httpd.daemon_threads = True
    scheme = "http"
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert_file, tls.key_file)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    state.base = f"{scheme}://{host}:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()
