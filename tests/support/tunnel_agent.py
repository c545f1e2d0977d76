"""A node's tunnel alone, as a process a test can kill -9.

    python -m support.tunnel_agent URL IDENTITY_DIR KEY_ID PUBLIC_KEY_B64 [HOST:]PORT

Serves the target ``web`` (HOST:PORT; 127.0.0.1 when no host is given) until killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from agent.link.identity import load_or_create
from agent.protocol import crypto
from agent.protocol.memory import reuse_freed_memory
from agent.services.tunnel import ServiceTunnel

__all__ = ["main"]


async def main(argv: list[str]) -> None:
    url, identity_dir, key_id, public_key, where = argv
    host, _, port = where.rpartition(":")
    address = (host or "127.0.0.1", int(port))

    async def resolve(target: str) -> tuple[str, int] | None:
        return address if target == "web" else None

    tunnel = ServiceTunnel(
        url=url,
        identity=load_or_create(Path(identity_dir)),
        pinned_keys={key_id: crypto.b64decode(public_key)},
        resolve=resolve,
    )
    await tunnel.run(asyncio.Event())


if __name__ == "__main__":
    reuse_freed_memory()  # as the daemon does
    asyncio.run(main(sys.argv[1:]))
