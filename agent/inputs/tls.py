"""TLS for one client connection, as bytes in and bytes out (``ssl.MemoryBIO``).

Not asyncio's TLS transport: in Python 3.11 it drops what it has buffered when the
server closes while reading is paused (it reads one buffer, then shuts down), and a fetch
pauses whenever the disk is behind. Here the received bytes wait in the incoming BIO
until they are asked for, whatever came after them.
"""

from __future__ import annotations

import ssl
from typing import cast

__all__ = ["ClientTls"]


class ClientTls:
    """The client side of one TLS session; the certificate is checked by ``context``."""

    def __init__(self, context: ssl.SSLContext, server_hostname: str) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._object = context.wrap_bio(
            self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname
        )
        self.ready = False
        """Whether the handshake is done (the server's certificate checked)."""

    def feed(self, data: bytes | memoryview) -> None:
        """Take bytes received from the server."""
        self._incoming.write(data)

    def feed_eof(self) -> None:
        """The server closed its side: what is taken is all there is."""
        self._incoming.write_eof()

    def handshake(self) -> bool:
        """Go on with the handshake; True once it is done (``ssl.SSLError`` if it failed:
        a certificate that does not check, say)."""
        if not self.ready:
            try:
                self._object.do_handshake()
                self.ready = True
            except ssl.SSLWantReadError:
                pass
        return self.ready

    def encrypt(self, data: bytes) -> None:
        """Take application bytes to send (once :attr:`ready`)."""
        self._object.write(data)

    def decrypt_into(self, buffer: memoryview) -> int | None:
        """Application bytes into ``buffer``: how many, 0 at the end of the stream (the
        server's close, with or without close_notify), None until more is fed."""
        try:
            # With a buffer, read() fills it and answers a count (typeshed says bytes).
            count = self._object.read(len(buffer), buffer)
            return cast(int, count)
        except ssl.SSLWantReadError:
            return None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0

    def outgoing(self) -> bytes:
        """What is to be sent to the server now (handshake, request, session messages)."""
        return self._outgoing.read()
