"""A coordinator killed -9 while SQLite checkpoints: its store opens again, nothing lost.

A checkpoint copies the WAL's pages into the database file in page order, page 1 first, so
a kill in the middle leaves a file whose header counts pages it does not have yet. The
database is still whole (the file and its WAL together); ``serve`` once refused it, read
without its WAL, as ``database disk image is malformed`` (the 10,000-agent restart, issue 14).
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from support.processes import Coordinator

from coordinator import cli_args

#: Messages the writer stores (each returned: acknowledged), ~56 KB each like a telemetry
#: batch: a WAL of ~56 MB, so that its checkpoint lasts long enough to be interrupted.
MESSAGES = 1000

# The writer: stores MESSAGES through the real Store while a reader holds every checkpoint
# back (the WAL keeps them all), then checkpoints on "go" (on stdin) until killed.
_WRITER = """
import sqlite3, sys
from pathlib import Path
from coordinator.store import Message, Store
path = Path(sys.argv[1])
store = Store(path)
store.nodes.seen("node-1", "key", 1.0)
reader = sqlite3.connect(path, isolation_level=None)
reader.execute("BEGIN")
reader.execute("SELECT COUNT(*) FROM nodes").fetchone()
body = {"samples": [{"load": "x" * 56000}]}
for first in range(1, int(sys.argv[2]), 100):
    calls = [
        lambda s, seq=seq: s.add_in_transaction(Message("node-1", seq, "telemetry", body, 2.0))
        for seq in range(first, first + 100)
    ]
    store.run_group(calls)
reader.execute("COMMIT")
print("stored", flush=True)
sys.stdin.readline()
reader.execute("PRAGMA wal_checkpoint(PASSIVE)")
"""


def _header_pages(db: Path) -> int:
    """The database size page 1 states (bytes 28-31 of the file's header)."""
    with db.open("rb") as f:
        return int.from_bytes(f.read(32)[28:32], "big")


def _killed_in_a_checkpoint(db: Path) -> None:
    """Store MESSAGES in ``db``, then kill -9 the writer once its checkpoint has begun
    growing the file (after page 1, before the last page)."""
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db), str(MESSAGES + 1)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert writer.stdin is not None
    assert writer.stdout is not None
    with contextlib.closing(writer.stdin), contextlib.closing(writer.stdout):
        assert writer.stdout.readline() == b"stored\n"
        size = db.stat().st_size
        writer.stdin.write(b"go\n")
        writer.stdin.flush()
        while db.stat().st_size == size and writer.poll() is None:
            pass  # the kill must land within the checkpoint's copy: no sleep here
        writer.send_signal(signal.SIGKILL)
        writer.wait()


def test_serve_opens_a_store_killed_in_a_checkpoint_and_every_stored_message_is_there(
    tmp_path: Path,
) -> None:
    coordinator = Coordinator(tmp_path)
    for _ in range(5):  # the kill lands after the copy's end only on a very fast disk
        for leftover in tmp_path.glob("coordinator.db*"):
            leftover.unlink()
        _killed_in_a_checkpoint(coordinator.db)
        if _header_pages(coordinator.db) * 4096 > coordinator.db.stat().st_size:
            break
    # The state the restart met: the file alone is torn, its WAL is still beside it.
    assert _header_pages(coordinator.db) * 4096 > coordinator.db.stat().st_size
    assert coordinator.db.with_name("coordinator.db-wal").stat().st_size > 0

    cli_args.check_db(coordinator.db)  # no bad_db
    coordinator.start()  # "listening on", not "error [bad_db]"
    try:
        assert coordinator.seqs() == [(seq, "telemetry") for seq in range(1, MESSAGES + 1)]
    finally:
        coordinator.kill()
    with contextlib.closing(sqlite3.connect(coordinator.db)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
