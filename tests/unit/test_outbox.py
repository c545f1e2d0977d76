"""The durable outbox: seqs, cumulative acks, the telemetry cap, and surviving kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from agent.link.outbox import DROPPABLE, SCHEMA_VERSION, TOMBSTONE, Entry, Outbox, OutboxError

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_700_000_000.0
EVERYTHING = 1_000_000


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "agent.db"


def _all(outbox: Outbox) -> list[Entry]:
    return outbox.pending(outbox.last_acked(), EVERYTHING)


# ------------------------------------------------------------------ seqs and acks


def test_seqs_start_at_one_and_increase_by_one(db: Path) -> None:
    with Outbox.open(db) as outbox:
        assert outbox.last_seq() == 0
        assert [outbox.append("profile", b"p", NOW) for _ in range(3)] == [1, 2, 3]
        assert outbox.append_many([("telemetry", b"a"), ("job_status", b"b")], NOW) == [4, 5]


def test_seq_is_not_reused_after_everything_is_acked_and_reopened(db: Path) -> None:
    with Outbox.open(db) as outbox:
        outbox.append("telemetry", b"a", NOW)
        outbox.append("telemetry", b"b", NOW)
        assert outbox.ack(2) == 2
    with Outbox.open(db) as outbox:
        assert outbox.depth() == 0
        assert outbox.last_acked() == 2
        assert outbox.append("profile", b"c", NOW) == 3


def test_ack_is_cumulative_and_returns_how_many_left(db: Path) -> None:
    with Outbox.open(db) as outbox:
        for i in range(5):
            outbox.append("job_status", b"%d" % i, NOW)
        assert outbox.ack(3) == 3
        assert outbox.last_acked() == 3
        assert [e.seq for e in _all(outbox)] == [4, 5]


def test_repeated_or_stale_ack_removes_nothing(db: Path) -> None:
    with Outbox.open(db) as outbox:
        for _ in range(4):
            outbox.append("job_status", b"x", NOW)
        outbox.ack(3)
        assert outbox.ack(3) == 0
        assert outbox.ack(1) == 0
        assert outbox.ack(0) == 0
        assert outbox.last_acked() == 3
        assert [e.seq for e in _all(outbox)] == [4]


def test_ack_beyond_the_last_seq_is_refused_with_ack_ahead_and_changes_nothing(db: Path) -> None:
    with Outbox.open(db) as outbox:
        outbox.append("profile", b"p", NOW)
        with pytest.raises(OutboxError) as caught:
            outbox.ack(2)
        assert caught.value.code == "ack_ahead"
        assert outbox.last_acked() == 0
        assert [e.seq for e in _all(outbox)] == [1]


def test_negative_ack_is_refused_with_bad_argument(db: Path) -> None:
    with Outbox.open(db) as outbox, pytest.raises(OutboxError) as caught:
        outbox.ack(-1)
    assert caught.value.code == "bad_argument"


def test_pending_is_in_seq_order_after_the_given_seq_and_limited(db: Path) -> None:
    with Outbox.open(db) as outbox:
        kinds = ["profile", "telemetry", "job_status", "job_log", "job_result"]
        for i, kind in enumerate(kinds):
            outbox.append(kind, b"body-%d" % i, NOW + i)
        page = outbox.pending(1, 3)
        assert page == [
            Entry(seq=2, kind="telemetry", body=b"body-1", created=NOW + 1),
            Entry(seq=3, kind="job_status", body=b"body-2", created=NOW + 2),
            Entry(seq=4, kind="job_log", body=b"body-3", created=NOW + 3),
        ]
        assert outbox.pending(5, 10) == []
        with pytest.raises(OutboxError) as caught:
            outbox.pending(0, 0)
        assert caught.value.code == "bad_argument"


def test_depth_and_depth_bytes_count_the_unacked_and_survive_reopen(db: Path) -> None:
    with Outbox.open(db) as outbox:
        outbox.append("profile", b"12345", NOW)
        outbox.append("telemetry", b"123", NOW)
        outbox.append("job_result", b"1", NOW)
        outbox.ack(1)
        assert (outbox.depth(), outbox.depth_bytes()) == (2, 4)
    with Outbox.open(db) as outbox:
        assert (outbox.depth(), outbox.depth_bytes()) == (2, 4)


def test_empty_kind_or_empty_batch_is_refused_with_bad_argument(db: Path) -> None:
    with Outbox.open(db) as outbox:
        for bad in ([("", b"x")], []):
            with pytest.raises(OutboxError) as caught:
                outbox.append_many(bad, NOW)
            assert caught.value.code == "bad_argument"
        assert outbox.last_seq() == 0


def test_last_coordinator_seq_survives_reopen_and_never_goes_back(db: Path) -> None:
    with Outbox.open(db) as outbox:
        assert outbox.last_coordinator_seq() == 0
        outbox.set_last_coordinator_seq(7)
        outbox.set_last_coordinator_seq(7)
    with Outbox.open(db) as outbox:
        assert outbox.last_coordinator_seq() == 7
        with pytest.raises(OutboxError) as caught:
            outbox.set_last_coordinator_seq(6)
        assert caught.value.code == "seq_backwards"
        assert outbox.last_coordinator_seq() == 7


def test_a_closed_outbox_refuses_with_closed(db: Path) -> None:
    outbox = Outbox.open(db)
    outbox.close()
    outbox.close()
    with pytest.raises(OutboxError) as caught:
        outbox.append("profile", b"p", NOW)
    assert caught.value.code == "closed"
    with pytest.raises(OutboxError):
        outbox.depth()


# ------------------------------------------------------------------ the telemetry cap


def test_cap_on_rows_drops_only_the_oldest_telemetry_never_other_kinds(db: Path) -> None:
    with Outbox.open(db, max_telemetry_rows=8) as outbox:
        keep = {}
        for i in range(9):
            keep[outbox.append("profile", b"profile-%d" % i, NOW)] = b"profile-%d" % i
            outbox.append("telemetry", b"telemetry-%d" % i, NOW)
            keep[outbox.append("job_result", b"result-%d" % i, NOW)] = b"result-%d" % i
        entries = _all(outbox)
    # The ninth batch made nine live ones: every other of the oldest four (1st, 3rd) went.
    telemetry = [e for e in entries if e.kind == "telemetry"]
    assert [e.body for e in telemetry if e.dropped] == [TOMBSTONE, TOMBSTONE]
    assert [e.seq for e in telemetry if e.dropped] == [telemetry[0].seq, telemetry[2].seq]
    assert sum(not e.dropped for e in telemetry) == 7
    assert {e.seq: e.body for e in entries if e.kind != "telemetry"} == keep
    assert not any(e.dropped for e in entries if e.kind != "telemetry")


def test_cap_on_bytes_drops_the_oldest_telemetry_first(db: Path) -> None:
    with Outbox.open(db, max_telemetry_bytes=1000) as outbox:
        for i in range(11):
            outbox.append("telemetry", bytes([i]) * 100, NOW)
            outbox.append("job_log", b"l" * 500, NOW)
        telemetry = [e for e in _all(outbox) if e.kind == "telemetry"]
        live = [e for e in telemetry if not e.dropped]
        assert sum(len(e.body) for e in live) <= 1000
        newest_dropped = max(e.seq for e in telemetry if e.dropped)
        assert newest_dropped < sorted(e.seq for e in live)[len(live) // 2]
        assert all(len(e.body) == 500 for e in _all(outbox) if e.kind == "job_log")


def test_dropped_batches_keep_their_seq_so_the_stream_has_no_gaps(db: Path) -> None:
    with Outbox.open(db, max_telemetry_rows=10) as outbox:
        for i in range(100):
            outbox.append("telemetry", b"t%d" % i, NOW)
        entries = _all(outbox)
    assert [e.seq for e in entries] == list(range(1, 101))
    assert sum(not e.dropped for e in entries) <= 10
    assert all(e.kind == "telemetry" for e in entries)


def test_thinning_keeps_the_newest_half_whole_and_fades_out_the_older(db: Path) -> None:
    with Outbox.open(db, max_telemetry_rows=16) as outbox:
        for i in range(200):
            outbox.append("telemetry", b"t%d" % i, NOW)
        live = [e.seq for e in _all(outbox) if not e.dropped]
    assert len(live) <= 16
    assert live[-8:] == list(range(193, 201))
    # Reaches back further than cutting at the cap would, at a coarser resolution.
    assert live[0] < 200 - 16
    assert live[:4] == [180, 184, 186, 188]


def test_kinds_not_known_to_be_droppable_are_never_dropped(db: Path) -> None:
    assert sorted(DROPPABLE) == ["telemetry"]
    with Outbox.open(db, max_telemetry_rows=1, max_telemetry_bytes=1) as outbox:
        for kind in ("profile", "job_status", "job_log", "job_result", "some_future_kind"):
            outbox.append(kind, b"x" * 1000, NOW)
        assert not any(e.dropped for e in _all(outbox))
        assert outbox.take_drop_report() == {}


def test_drop_report_counts_drops_survives_reopen_then_resets(db: Path) -> None:
    with Outbox.open(db, max_telemetry_rows=4) as outbox:
        for _ in range(5):
            outbox.append("telemetry", b"t", NOW)
        dropped = sum(e.dropped for e in _all(outbox))
        assert dropped == 1
    with Outbox.open(db, max_telemetry_rows=4) as outbox:
        assert outbox.take_drop_report() == {"telemetry": 1}
        assert outbox.take_drop_report() == {}


def test_acking_tombstones_frees_the_cap(db: Path) -> None:
    with Outbox.open(db, max_telemetry_rows=4) as outbox:
        for _ in range(5):
            outbox.append("telemetry", b"t", NOW)
        outbox.ack(5)
        for _ in range(4):
            outbox.append("telemetry", b"t", NOW)
        assert not any(e.dropped for e in _all(outbox))


# ------------------------------------------------------------------ the file


def test_database_is_wal_with_full_sync_and_strict_tables(db: Path) -> None:
    with Outbox.open(db) as outbox:
        outbox.append("profile", b"p", NOW)
        assert outbox._db().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        probe = sqlite3.connect(db)
        try:
            assert probe.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert probe.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            tables = {row[0] for row in probe.execute("SELECT name FROM sqlite_master")}
            strict = {
                row[0]
                for row in probe.execute("SELECT name FROM pragma_table_list WHERE strict = 1")
            }
        finally:
            probe.close()
    assert {"outbox", "meta", "dropped"} <= tables
    assert {"outbox", "meta", "dropped"} <= strict


def test_database_file_is_readable_by_its_owner_only(db: Path) -> None:
    Outbox.open(db).close()
    assert db.stat().st_mode & 0o777 == 0o600


def test_file_from_a_newer_agent_is_refused_with_schema_too_new(db: Path) -> None:
    Outbox.open(db).close()
    probe = sqlite3.connect(db)
    try:
        probe.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        probe.commit()
    finally:
        probe.close()
    with pytest.raises(OutboxError) as caught:
        Outbox.open(db)
    assert caught.value.code == "schema_too_new"


def test_a_file_that_is_not_a_database_is_refused_with_storage_error(db: Path) -> None:
    db.write_bytes(b"not a database, " * 100)
    with pytest.raises(OutboxError) as caught:
        Outbox.open(db)
    assert caught.value.code == "storage_error"


# ------------------------------------------------------------------ kill -9

# Appends (one at a time and in pairs) and acks in a tight loop, printing each seq only
# after the call that committed it returned; the small cap makes it thin as it goes.
CHILD = """
import sys
from pathlib import Path
from agent.link.outbox import Outbox

outbox = Outbox.open(Path(sys.argv[1]), max_telemetry_rows=20)
i = 0
while True:
    kind = "job_result" if i % 3 == 0 else "telemetry"
    bodies = [f"{sys.argv[2]}-{i}", f"{sys.argv[2]}-{i}+"][: 1 + (i % 5 == 4)]
    seqs = outbox.append_many([(kind, body.encode()) for body in bodies], 0.0)
    for seq, body in zip(seqs, bodies):
        print("append", seq, kind, body, flush=True)
    if i % 7 == 6 and outbox.last_seq() - 10 > outbox.last_acked():
        outbox.ack(outbox.last_seq() - 10)
        print("ack", outbox.last_acked(), "-", "-", flush=True)
    i += 1
"""


def _run_and_kill(db: Path, round_: int, lines: int) -> tuple[dict[int, tuple[str, bytes]], int]:
    """Run the child until it has printed ``lines`` lines, SIGKILL it, return what it said."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), str(round_)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdout is not None
    committed: dict[int, tuple[str, bytes]] = {}
    acked = 0
    try:
        for _ in range(lines):
            what, seq, kind, body = child.stdout.readline().split()
            if what == "append":
                committed[int(seq)] = (kind, body.encode())
            else:
                acked = int(seq)
    finally:
        # Killed while it keeps appending: likely mid-transaction.
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return committed, acked


def test_kill_9_while_appending_loses_and_duplicates_nothing_committed(db: Path) -> None:
    for round_, lines in enumerate((60, 173, 311)):
        committed, acked = _run_and_kill(db, round_, lines)
        with Outbox.open(db, max_telemetry_rows=20) as outbox:
            last_acked, last_seq = outbox.last_acked(), outbox.last_seq()
            entries = _all(outbox)
            assert outbox.depth() == len(entries)
        assert last_acked >= acked
        assert max(committed) <= last_seq
        # Contiguous from the ack on: every committed, unacked seq is there exactly once.
        assert [e.seq for e in entries] == list(range(last_acked + 1, last_seq + 1))
        for entry in entries:
            if entry.seq in committed:
                kind, body = committed[entry.seq]
                assert entry.kind == kind
                assert entry.body == (TOMBSTONE if entry.dropped else body)
                assert not entry.dropped or kind in DROPPABLE
        assert any(e.kind == "job_result" and e.seq in committed for e in entries)


# ------------------------------------------------------------------ any sequence of operations

KINDS = st.sampled_from(["telemetry", "telemetry", "profile", "job_status", "job_log"])
BODIES = st.binary(max_size=60)
ROWS_CAP, BYTES_CAP = 4, 150


class OutboxMachine(RuleBasedStateMachine):
    """Random appends, acks, reopens and drop reports against a model of what was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.path = Path(self.tmp.name) / "agent.db"
        self.outbox = self._open()
        self.appended: dict[int, tuple[str, bytes]] = {}
        self.last_seq = self.last_acked = 0
        self.tombstoned: set[int] = set()
        self.unreported = 0

    def _open(self) -> Outbox:
        return Outbox.open(self.path, max_telemetry_rows=ROWS_CAP, max_telemetry_bytes=BYTES_CAP)

    @rule(kind=KINDS, body=BODIES)
    def append(self, kind: str, body: bytes) -> None:
        seq = self.outbox.append(kind, body, NOW)
        assert seq == self.last_seq + 1
        self.appended[seq] = (kind, body)
        self.last_seq = seq

    @rule(items=st.lists(st.tuples(KINDS, BODIES), min_size=1, max_size=6))
    def append_many(self, items: list[tuple[str, bytes]]) -> None:
        seqs = self.outbox.append_many(items, NOW)
        assert seqs == list(range(self.last_seq + 1, self.last_seq + 1 + len(items)))
        self.appended.update(zip(seqs, items, strict=True))
        self.last_seq = seqs[-1]

    @rule(step=st.integers(min_value=-2, max_value=8))
    def ack(self, step: int) -> None:
        seq = max(0, self.last_acked + step)
        if seq > self.last_seq:
            with pytest.raises(OutboxError) as caught:
                self.outbox.ack(seq)
            assert caught.value.code == "ack_ahead"
            return
        removed = self.outbox.ack(seq)
        assert removed == max(0, seq - self.last_acked)
        self.last_acked = max(self.last_acked, seq)

    @rule()
    def reopen(self) -> None:
        self.outbox.close()
        self.outbox = self._open()

    @rule()
    def take_drop_report(self) -> None:
        expected = {"telemetry": self.unreported} if self.unreported else {}
        assert self.outbox.take_drop_report() == expected
        self.unreported = 0

    @invariant()
    def pending_is_appended_minus_acked_with_only_telemetry_dropped(self) -> None:
        entries = self.outbox.pending(self.last_acked, EVERYTHING)
        assert [e.seq for e in entries] == list(range(self.last_acked + 1, self.last_seq + 1))
        assert (self.outbox.last_seq(), self.outbox.last_acked()) == (
            self.last_seq,
            self.last_acked,
        )
        assert self.outbox.depth() == len(entries)
        assert self.outbox.depth_bytes() == sum(len(e.body) for e in entries)
        live = [e for e in entries if e.kind in DROPPABLE and not e.dropped]
        assert len(live) <= ROWS_CAP
        assert sum(len(e.body) for e in live) <= BYTES_CAP
        for entry in entries:
            kind, body = self.appended[entry.seq]
            assert entry.kind == kind
            if entry.dropped:
                assert kind in DROPPABLE
                assert entry.body == TOMBSTONE
            else:
                assert entry.seq not in self.tombstoned
                assert entry.body == body
        new = {e.seq for e in entries if e.dropped} - self.tombstoned
        self.tombstoned |= new
        self.unreported += len(new)

    def teardown(self) -> None:
        self.outbox.close()
        self.tmp.cleanup()


TestOutboxMachine = OutboxMachine.TestCase
TestOutboxMachine.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
