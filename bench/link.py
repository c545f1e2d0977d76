"""Benchmarks of the agent's link to the reference coordinator, and of the coordinator.

Run with ``make bench`` (or ``python bench/link.py --quick``). The coordinator is always
``gpu-coordinator serve`` in a child process; the agent side runs in this process. Figures
are printed and written to ``bench/results/link.json``; nothing here is asserted.

- throughput: telemetry batches (10 samples of the host and 8 GPUs) per second from a
  filled durable outbox through :class:`agent.link.connection.Link` until the coordinator has acked
  them all; against the same frames from a bare ``websockets`` send loop to a bare sink
  that also commits each frame to SQLite (WAL, synchronous=FULL) before acking it (goal:
  the link at least half of that), and to a sink that acks without storing.
- restart: the coordinator stopped (SIGTERM) and started on the same port and database
  while the agent streams; seconds until the first new message is stored, median of 10.

A fleet of simulated agents on one coordinator (issue 14) is ``bench/coordinator_load.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import psutil
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

ROOT = Path(__file__).resolve().parent.parent
# In place of this script's own directory, whose hal.py would shadow the hal package.
sys.path[0] = str(ROOT / "tests")

from support.fakenvml import build  # noqa: E402

from agent.link.connection import Link, LinkConfig  # noqa: E402
from agent.link.identity import load_or_create  # noqa: E402
from agent.link.outbox import Outbox  # noqa: E402
from agent.protocol.bodies import TelemetryBody  # noqa: E402
from agent.protocol.limits import MAX_FRAME_BYTES  # noqa: E402
from agent.protocol.messages import (  # noqa: E402
    Message,
)
from coordinator import keys  # noqa: E402
from hal.backend import HalConfig  # noqa: E402
from hal.host import host_sample  # noqa: E402
from hal.machine import Hal  # noqa: E402
from hal.types import Sample  # noqa: E402

CAPTURE = ROOT / "tests" / "fixtures" / "nvidia-smi-xml" / "dual_a5000-v13.xml"
GPUS = 8
BATCH_SAMPLES = 10  # the daemon's default: one batch of 10 one-second samples
KiB = 1024


def telemetry_body(out_dir: Path) -> bytes:
    """One encoded TelemetryBody: 10 real samples of the host and 8 fake-NVML A5000s."""
    library = build.build_library(build.replicate(build.parse_capture(CAPTURE), GPUS), out_dir)
    hal = Hal(HalConfig(nvml_library=str(library), backends=("nvml",)))
    hal.open()
    try:
        samples = [
            Sample(taken_at=time.time(), host=host_sample(), gpus=hal.sample())
            for _ in range(BATCH_SAMPLES)
        ]
    finally:
        hal.close()
    return msgspec.json.encode(TelemetryBody(samples=msgspec.to_builtins(samples)))


def telemetry_frame(seq: int, body: bytes) -> str:
    """The frame the link sends for an outbox entry (the body is already encoded there)."""
    return f'{{"v":1,"type":"telemetry","seq":{seq},"body":{body.decode()}}}'


def free_port() -> int:
    """A TCP port free now, to be reused across coordinator restarts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CoordinatorProcess:
    """``gpu-coordinator serve`` as a child process, on a port and database kept across restarts."""

    def __init__(self, workdir: Path, options: tuple[str, ...] = (), db: str | None = None) -> None:
        """``db``: a PostgreSQL URL (default: a SQLite file in ``workdir``)."""
        workdir.mkdir(parents=True)
        self.options = options
        """More ``serve`` options."""
        self.db: Path | str = workdir / "coordinator.db" if db is None else db
        self.state_dir = workdir / "state"
        key = keys.load_or_create(self.state_dir)  # created here, loaded by the child
        self.pinned = {key.key_id: key.public_key}
        self.port = free_port()
        self.artifacts_port = free_port()  # not --port + 1, which may be taken
        self.url = f"ws://127.0.0.1:{self.port}/agent"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start it and return once it listens (an asyncio child: the link keeps running)."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "coordinator.cli", "serve", "--host", "127.0.0.1",
            "--port", str(self.port), "--artifacts-port", str(self.artifacts_port),
            "--db", str(self.db), "--state-dir", str(self.state_dir),
            "--gateway-port", "0", *self.options,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.process.stdout is not None
        assert b"listening on" in await self.process.stdout.readline()

    async def stop(self) -> None:
        """SIGTERM (it closes every connection with 1001) and wait for it to exit."""
        assert self.process is not None
        self.process.terminate()
        await self.process.wait()

    def rss(self) -> int:
        """Its resident set size in bytes."""
        assert self.process is not None
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def stored_max(self, node_id: str) -> int:
        """The highest seq stored from ``node_id`` (read beside the writer: WAL)."""
        db = sqlite3.connect(self.db)
        try:
            row = db.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM messages WHERE node_id = ?", (node_id,)
            ).fetchone()
        finally:
            db.close()
        return int(row[0])

    async def stored_above(self, node_id: str, seq: int) -> None:
        """Return once a seq above ``seq`` from ``node_id`` is stored."""
        await wait_until(lambda: self.stored_max(node_id) > seq, timeout=60)


async def ignore(message: Message) -> None:
    """A handler that queues nothing in answer (the bench's agent does not attest)."""


async def wait_until(condition: Callable[[], bool], timeout: float, poll_s: float = 0.005) -> None:
    """Poll ``condition()`` until it is true."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(poll_s)


# ---------------------------------------------------------------- throughput


async def through_link(
    coordinator: CoordinatorProcess, state: Path, body: bytes, n: int
) -> dict[str, float]:
    """Batches per second from a filled outbox until all are acked; single appends per second."""
    identity = load_or_create(state / "identity")
    with Outbox.open(state / "outbox.db") as outbox:
        singles = min(100, n)
        start = time.perf_counter()
        for _ in range(singles):
            outbox.append("telemetry", body, time.time())
        append_s = time.perf_counter() - start
        outbox.append_many([("telemetry", body)] * (n - singles), time.time())
        config = LinkConfig(url=coordinator.url, pinned_keys=coordinator.pinned)
        link = Link(config, identity, outbox, ignore, "bench")
        stop = asyncio.Event()
        running = asyncio.create_task(link.run(stop))
        await link.connected.wait()
        start = time.perf_counter()
        await wait_until(lambda: outbox.last_acked() >= n, timeout=300)
        elapsed = time.perf_counter() - start
        stop.set()
        await running
    return {"link_msgs_per_s": n / elapsed, "outbox_appends_per_s": singles / append_s}


class _Seq(msgspec.Struct):
    seq: int


class _AckFrame(msgspec.Struct):
    body: _Seq


async def sink(db_path: str) -> None:
    """A bare websockets server: commit each frame to SQLite (unless ``-``), then ack its seq."""
    store = db_path != "-"
    db = sqlite3.connect(db_path if store else ":memory:", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # as the coordinator's store
    db.execute("CREATE TABLE messages (seq INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    seq_of = msgspec.json.Decoder(_Seq)

    async def handler(ws: ServerConnection) -> None:
        async for frame in ws:
            seq = seq_of.decode(frame).seq
            if store:
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO messages (seq, body) VALUES (?, ?)", (seq, frame))
                db.execute("COMMIT")
            await ws.send(f'{{"v":1,"type":"ack","body":{{"seq":{seq}}}}}')

    async with serve(handler, "127.0.0.1", 0, max_size=MAX_FRAME_BYTES) as server:
        print(next(iter(server.sockets)).getsockname()[1], flush=True)
        await asyncio.Future()


async def through_bare(db_path: str, body: bytes, n: int) -> float:
    """Frames per second from a bare send loop to a bare sink until the last is acked."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--sink", db_path, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    port = int(await process.stdout.readline())
    frames = [telemetry_frame(seq, body) for seq in range(1, n + 1)]
    ack_of = msgspec.json.Decoder(_AckFrame)
    try:
        async with connect(f"ws://127.0.0.1:{port}/", max_size=MAX_FRAME_BYTES) as ws:

            async def acks() -> None:
                async for frame in ws:
                    if ack_of.decode(frame).body.seq == n:
                        return

            start = time.perf_counter()
            acked = asyncio.create_task(acks())
            for frame in frames:
                await ws.send(frame)
            await acked
            elapsed = time.perf_counter() - start
    finally:
        process.terminate()
        await process.wait()
    return n / elapsed


async def bench_throughput(work: Path, body: bytes, n: int) -> dict[str, float]:
    """The link against the bare loop, with storage and without."""
    coordinator = CoordinatorProcess(work / "throughput")
    await coordinator.start()
    try:
        link = await through_link(coordinator, work / "throughput" / "agent", body, n)
    finally:
        await coordinator.stop()
    bare = await through_bare(str(work / "sink.db"), body, n)
    bare_no_store = await through_bare("-", body, n)
    return {
        "batch_bytes": len(body),
        "batches": n,
        **link,
        "bare_sqlite_msgs_per_s": bare,
        "bare_no_store_msgs_per_s": bare_no_store,
        "link_to_bare_sqlite": link["link_msgs_per_s"] / bare,
    }


# ---------------------------------------------------------------- restart


async def bench_restart(work: Path, body: bytes, restarts: int) -> dict[str, float]:
    """Restart the coordinator under a streaming link; time until it stores anew."""
    coordinator = CoordinatorProcess(work / "restart")
    state = work / "restart" / "agent"
    identity = load_or_create(state / "identity")
    config = LinkConfig(url=coordinator.url, pinned_keys=coordinator.pinned)
    await coordinator.start()
    from_stop, from_ready, down = [], [], []
    with Outbox.open(state / "outbox.db") as outbox:
        link = Link(config, identity, outbox, ignore, "bench")
        stop = asyncio.Event()

        async def produce() -> None:  # faster than the daemon's 1 per 10 s: a finer clock
            while True:
                outbox.append("telemetry", body, time.time())
                link.wakeup.set()
                await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(link.run(stop)), asyncio.create_task(produce())]
        try:
            await coordinator.stored_above(identity.node_id, 0)
            for _ in range(restarts):
                await asyncio.sleep(0.3)
                stopping = time.perf_counter()
                await coordinator.stop()
                before = coordinator.stored_max(identity.node_id)
                await coordinator.start()
                ready = time.perf_counter()
                await coordinator.stored_above(identity.node_id, before)
                streaming = time.perf_counter()
                from_stop.append(streaming - stopping)
                from_ready.append(streaming - ready)
                down.append(ready - stopping)
        finally:
            stop.set()
            tasks[1].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await coordinator.stop()
    return {
        "backoff_initial_s": config.backoff_initial_s,
        "backoff_max_s": config.backoff_max_s,
        "restarts": restarts,
        "restart_stop_to_ready_median_s": statistics.median(down),
        "restart_ready_to_stored_median_s": statistics.median(from_ready),
        "restart_ready_to_stored_max_s": max(from_ready),
        "restart_stop_to_stored_median_s": statistics.median(from_stop),
    }


async def bench(args: argparse.Namespace) -> dict[str, float]:
    """Every benchmark, one after the other."""
    with tempfile.TemporaryDirectory(dir=ROOT / "build") as tmp:  # a real disk: fsync counts
        work = Path(tmp)
        body = await asyncio.to_thread(telemetry_body, work / "nvml")
        results = await bench_throughput(work, body, args.batches)
        results |= await bench_restart(work, body, args.restarts)
    return results


def main() -> None:
    """Run the benchmarks and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches, restarts, agents")
    parser.add_argument("--sink", help=argparse.SUPPRESS)  # the bare sink's child process
    args = parser.parse_args()
    if args.sink is not None:
        asyncio.run(sink(args.sink))
        return
    args.batches = 1000 if args.quick else 3000
    args.restarts = 3 if args.quick else 10
    (ROOT / "build").mkdir(exist_ok=True)
    results = asyncio.run(bench(args))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "link.json").write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        print(f"{key:38} {value:10.3f}")


if __name__ == "__main__":
    main()
