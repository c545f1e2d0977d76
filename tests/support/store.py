"""A small hostile object store: answers PUTs with the statuses a test scripts, or stalls.

It reads each body to the end (so a client never sees a reset mid-send), records what it
kept, and answers the next scripted status (then 200 once the script is spent). ``stall``
holds every PUT open after its headers until ``release`` is set: a store that hangs.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["Store", "running_store"]


@dataclass
class Store:
    """What the store was told to do, and what it saw."""

    url: str = ""
    script: list[int] = field(default_factory=list)
    stall: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)
    objects: dict[str, str] = field(default_factory=dict)
    """Path -> SHA-256 of each body answered 2xx."""
    puts: int = 0


@contextmanager
def running_store() -> Iterator[Store]:
    """The store on 127.0.0.1:<free port>; stopped (and any stall released) after."""
    store = Store()

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            store.puts += 1
            if store.stall:
                store.stalled.set()
                store.release.wait(60)
            length = int(self.headers.get("Content-Length", "0"))
            digest = hashlib.sha256()
            left = length
            while left:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    return
                digest.update(chunk)
                left -= len(chunk)
            status = store.script.pop(0) if store.script else 200
            if 200 <= status < 300:
                store.objects[self.path] = digest.hexdigest()
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    store.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield store
    finally:
        store.release.set()
        server.shutdown()
        server.server_close()
        thread.join()
