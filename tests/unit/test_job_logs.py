"""A job's output into job_log chunks: whole characters, bounded, batched, in order."""

from __future__ import annotations

import msgspec

from agent.jobs.logs import CHUNK_BYTES, LogForwarder
from agent.jobs.machine import Decision, Logs
from agent.protocol.limits import MAX_LOG_CHUNK_BYTES


class Sink:
    def __init__(self) -> None:
        self.commits: list[list[tuple[str, str]]] = []

    def __call__(self, decision: Decision) -> None:
        bodies = [msgspec.json.decode(b) for kind, b in decision.messages if kind == "job_log"]
        chunks = [(b["stream"], b["data"]) for b in bodies]
        # The ledger's copy goes with the messages, the same chunks.
        assert decision.rows == (Logs("job-1", tuple(chunks)),)
        self.commits.append(chunks)


def test_a_character_split_across_reads_stays_whole() -> None:
    sink = Sink()
    logs = LogForwarder("job-1", sink)
    euro = "€".encode()  # three bytes
    logs.add("stdout", b"price: " + euro[:1])
    logs.add("stdout", euro[1:] + b"\n")
    logs.flush(final=True)
    assert sink.commits == [[("stdout", "price: €\n")]]


def test_streams_keep_their_order_and_invalid_bytes_are_replaced() -> None:
    sink = Sink()
    logs = LogForwarder("job-1", sink)
    logs.add("stdout", b"a\n")
    logs.add("stderr", b"oops \xff\n")
    logs.add("stdout", b"b\n")
    logs.flush()
    assert sink.commits == [[("stdout", "a\n"), ("stderr", "oops \ufffd\n"), ("stdout", "b\n")]]
    logs.flush()
    assert len(sink.commits) == 1  # nothing new: no empty commit


def test_much_output_is_cut_into_bounded_chunks_in_few_commits() -> None:
    sink = Sink()
    logs = LogForwarder("job-1", sink)
    for _ in range(100):
        logs.add("stdout", b"x" * 1000 + b"\n")
    logs.flush(final=True)
    chunks = [data for commit in sink.commits for _, data in commit]
    assert "".join(chunks) == ("x" * 1000 + "\n") * 100
    assert all(len(chunk.encode()) <= CHUNK_BYTES <= MAX_LOG_CHUNK_BYTES for chunk in chunks)
    assert len(sink.commits) < 10
