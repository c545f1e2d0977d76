"""The relays' allocator settings (the agent's daemon, the coordinator): a buffer of a
relay's size, made and freed again and again, reuses its pages instead of faulting fresh
ones in each time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator import cli

_LOOP = """
import resource, sys
from agent.protocol.memory import reuse_freed_memory
if sys.argv[1] == "tuned":
    assert reuse_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(500):
    buffer = bytearray(256 * 1024)  # a read of the tunnel's size, zeroed: every page touched
    joined = bytes(buffer) + b"frame"
    del buffer, joined
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _LOOP, mode], capture_output=True, text=True, check=True, timeout=60
    )
    return int(done.stdout)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_buffers_made_and_freed_in_a_loop_reuse_their_pages() -> None:
    # 500 rounds of 2 x 256 KiB: 64 pages each, ~64,000 faults if each is fresh memory.
    assert _faults("plain") > 500 * 64
    assert _faults("tuned") < 500


def test_gpu_coordinator_serve_relays_with_the_same_settings_as_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both ends of a tunnel relay the same buffers: the coordinator sets the allocator up
    # before it serves, as the agent's daemon does (a third of its relaying CPU otherwise).
    calls: list[str] = []

    def tuned() -> bool:
        calls.append("tuned")
        return True

    async def serve(*_: object) -> None:
        calls.append("serve")

    monkeypatch.setattr(cli, "reuse_freed_memory", tuned)
    monkeypatch.setattr(cli, "_serve", serve)
    argv = ["serve", "--port", "0", "--state-dir", str(tmp_path / "state")]
    assert cli.main([*argv, "--db", str(tmp_path / "c.db")]) == 0
    assert calls == ["tuned", "serve"]
