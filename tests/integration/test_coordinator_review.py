"""The reference coordinator against the findings of an adversarial review: storage that
grows without bound, settings and files read without limit, a client that waits for ever,
and a CLI that dies on a closed pipe. Real coordinator on 127.0.0.1:0, real SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.admission import answers_until_ack, codes, recv, refusal, started, telemetry, welcomed
from support.factories import deflated_frame
from support.nodes import Node

from agent.protocol import crypto
from agent.protocol.messages import JobStatusBody, encode_frame, wrap
from coordinator import admission, cli, client, keys
from coordinator.server import Coordinator, Settings
from coordinator.store import Store

Capsys = pytest.CaptureFixture[str]

_MIB = 1024 * 1024

# ------------------------------------------------------------------ 1. storage bounded


async def test_nodes_that_never_attest_keep_only_the_small_quota_each(tmp_path: Path) -> None:
    small = 2 * _MIB
    nodes = [Node() for _ in range(3)]
    async with started(tmp_path, unverified_quota_bytes=small) as coordinator:
        for node in nodes:
            async with welcomed(coordinator, node) as (ws, _):
                for seq in range(1, 11):
                    await ws.send(telemetry(seq, 1000 * 1000))
                await answers_until_ack(ws, 10)
        store = coordinator.store
        for node in nodes:
            assert store.retention.stored_bytes(node.node_id) <= small
            assert store.nodes.last_agent_seq(node.node_id) == 10


async def test_the_store_cap_holds_over_all_nodes_and_job_status_is_never_shed(
    tmp_path: Path,
) -> None:
    # What three 1 MB frames and a little more weigh as stored (deflated).
    cap = len(deflated_frame(telemetry(1, 1000 * 1000).encode())) * 3 * _MIB // 1_000_000
    first, second, third = Node(), Node(), Node()
    async with started(
        tmp_path, unverified_quota_bytes=64 * _MIB, store_max_bytes=cap
    ) as coordinator:
        store = coordinator.store

        def total() -> int:
            return sum(store.retention.stored_bytes(n.node_id) for n in (first, second, third))

        async with welcomed(coordinator, first) as (ws, _):
            for seq in range(1, 6):
                await ws.send(telemetry(seq, 1000 * 1000))
            assert codes(await answers_until_ack(ws, 5)) == []  # its own oldest make room
        assert total() <= cap
        async with welcomed(coordinator, second) as (ws, _):
            await ws.send(telemetry(1, 1000 * 1000))
            seen = await answers_until_ack(ws, 1)
            seen.append(await recv(ws))
            assert "quota_exceeded" in codes(seen)
            assert total() <= cap
            status = JobStatusBody(job_id="job-1", state="refused", code="busy")
            await ws.send(encode_frame(wrap(status, 2)))
            assert codes(await answers_until_ack(ws, 2)) == []
        assert store.nodes.messages(second.node_id, "job_status")[0].body["code"] == "busy"
        async with welcomed(coordinator, third) as (ws, _):
            for seq in range(1, 4):
                await ws.send(telemetry(seq, 1000 * 1000))
            await answers_until_ack(ws, 3)
        assert store.retention.stored_bytes(third.node_id) < 1000


# ------------------------------------------------------------------ 2. the tokens file, bounded


# ------------------------------------------------------------------ 3. a reader that goes away


def _to_closed_pipe(*argv: str) -> subprocess.CompletedProcess[str]:
    """``gpu-coordinator ARGV | true``, the reader gone before anything is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "coordinator.cli", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)


def test_key_to_a_reader_gone_ends_quietly_with_141(tmp_path: Path) -> None:
    keys.load_or_create(tmp_path)
    done = _to_closed_pipe("key", "--state-dir", str(tmp_path))
    assert (done.returncode, done.stderr) == (cli.EXIT_BROKEN_PIPE, "")


async def test_jobs_to_a_reader_gone_ends_quietly_with_141(tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = Coordinator(db_path=tmp_path / "c.db", state_dir=state, settings=Settings())
    async with server:
        for extra in ([], ["--json"]):
            argv = ("jobs", "--state-dir", str(state), *extra)
            done = await asyncio.to_thread(_to_closed_pipe, *argv)
            assert (done.returncode, done.stderr) == (cli.EXIT_BROKEN_PIPE, "")


# ------------------------------------------------------------------ 4. a deadline in all


async def test_jobs_against_a_server_that_drips_its_answer_gives_up_with_a_code(
    tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every read gets a byte well within the timeout; the answer never ends.
    monkeypatch.setattr(client, "_TIMEOUT_S", 1.0)
    gone = asyncio.Event()

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{")
        with contextlib.suppress(ConnectionError):
            while not reader.at_eof():
                writer.write(b" ")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(1), 0.2)
        gone.set()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    server = await asyncio.start_server(drip, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        fd = os.open(tmp_path / "admin.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump({"url": url, "token": "t"}, file)
        argv = ["jobs", "--state-dir", str(tmp_path)]
        returned = await asyncio.to_thread(cli.main, argv)
        await gone.wait()  # the client hung up: the server's side ends too
    err = capsys.readouterr().err
    assert returned == cli.EXIT_ERROR, err
    assert "error [admin_timeout]" in err


# ------------------------------------------------------------------ 5. settings SQLite can hold


async def test_a_retention_pass_that_fails_is_logged_and_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(retention_interval_s=0.01)
    # What the checks now refuse, forced in: the pass fails as it did (OverflowError).
    object.__setattr__(settings, "telemetry_keep_rows", 10**20)
    store = Store(tmp_path / "c.db")  # a node for the pass to prune
    store.nodes.seen("node-1", "key", 0.0)
    store.close()
    server = Coordinator(db_path=tmp_path / "c.db", state_dir=tmp_path / "s", settings=settings)
    with caplog.at_level(logging.ERROR, logger="coordinator"):
        async with server:
            for _ in range(2):  # at start, and again: the task goes on
                async with asyncio.timeout(10):
                    await server.retained.wait()
                server.retained.clear()
    failed = [r for r in caplog.records if r.getMessage().startswith("retention: the pass failed")]
    assert len(failed) >= 2
    assert failed[0].exc_info is not None


# ------------------------------------------------------------------ 6. admission and state dir


async def test_an_allowed_key_given_url_safe_and_unpadded_admits_its_node(
    tmp_path: Path,
) -> None:
    allowed, stranger = Node(), Node()
    standard = crypto.b64encode(allowed.public_key)
    url_safe = standard.rstrip("=").replace("+", "-").replace("/", "_")
    entries = frozenset({admission.allow_entry(url_safe), admission.allow_entry(Node().node_id)})
    async with started(tmp_path, admission="allow_list", allowed=entries) as coordinator:
        async with welcomed(coordinator, allowed):
            pass
        assert await refusal(coordinator, stranger) == "not_admitted"
