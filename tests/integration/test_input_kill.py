"""An agent killed mid-fetch leaves no cache entry that looks whole."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from support.input_server import serve_input

from agent.inputs.cache import InputCache
from agent.inputs.fetch import FetchLimits, fetch

ROOT = Path(__file__).resolve().parents[2]
DATA = os.urandom(1 << 20)
SHA = hashlib.sha256(DATA).hexdigest()
_FETCHER = """
import asyncio, functools, sys
from pathlib import Path
from agent.inputs.cache import InputCache
from agent.inputs.fetch import FetchLimits, fetch

root, url, sha, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

async def main():
    cache = InputCache(Path(root), 1 << 30)
    cache.open()
    fill = functools.partial(
        fetch, url, sha256=sha, size_bytes=size, allowed_hosts=["127.0.0.1"],
        limits=FetchLimits(stall_s=3600, deadline_s=3600),
    )
    async with cache.use(sha, size, fill):
        pass

asyncio.run(main())
"""


async def test_a_fetch_killed_midway_is_not_an_entry_and_is_fetched_again(tmp_path: Path) -> None:
    root = tmp_path / "inputs"
    with serve_input(DATA) as server:
        fetcher = subprocess.Popen(
            [sys.executable, "-c", _FETCHER, str(root), server.url("/stall"), SHA, str(len(DATA))],
            cwd=ROOT,
        )
        try:
            await asyncio.to_thread(server.stalled.wait)
        finally:
            fetcher.send_signal(signal.SIGKILL)
            fetcher.wait()
        [partial] = (root / "tmp").iterdir()
        assert partial.name.startswith(SHA)
        assert not (root / "sha256" / SHA).exists()

        cache = InputCache(root, 1 << 30)
        cache.open()
        assert not partial.exists()
        assert not cache.holds(SHA)

        async def fill(fd: int) -> None:
            await fetch(
                server.url("/file"),
                fd,
                sha256=SHA,
                size_bytes=len(DATA),
                allowed_hosts=["127.0.0.1"],
                limits=FetchLimits(),
            )

        async with cache.use(SHA, len(DATA), fill) as path:
            assert path.read_bytes() == DATA
