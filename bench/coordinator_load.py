"""Load on one coordinator: N simulated agents at the daemon's cadence, then a restart.

``python bench/coordinator_load.py --agents 1000,5000,10000`` (issue 14). The coordinator is
``gpu-coordinator serve`` in its own process (:class:`bench.link.CoordinatorProcess`); the
agents run in ``--procs`` client processes. Each agent does what a daemon does: the real
handshake (its ``hello`` naming its profile's digest, unless ``--no-digest``), a signed
``profile`` answering the coordinator's ``attest_request``, a ``node_status``, then a
telemetry batch (10 one-second samples of the host and 8 GPUs, about 56 KB) every
``--interval`` seconds, each agent at its own phase, numbered whether it is connected or
not (the daemon's sampler goes on while the link is down). Measured over the
``--duration`` s steady window: ack latency p50/p99/max, the coordinator's CPU (fraction of
one core) and peak RSS, errors and disconnects. Then the restart: the coordinator is
killed (SIGKILL) and started again on the same database; every agent reconnects with the
real agent's jittered backoff (:func:`agent.link.connection.retry`) and resends what was
not acknowledged; the figure is the seconds from the kill until every agent has had a new
batch acknowledged (or ``--restart-timeout``, with how many agents were not back by then).
Figures are printed and written to ``bench/results/coordinator_load.json``.

``--handshakes-only`` measures what one reconnect costs the coordinator: the agents send no
telemetry, so the restart is only the reconnect storm (TCP, HTTP upgrade, the handshake,
and, when the coordinator asks, the ``attest_request`` and the signed profile answering
it); an agent is back once welcomed, or once its new profile is acknowledged when it was
asked for one, and the figure is the coordinator's CPU from listening until all are back,
per agent. ``--pyspy FILE`` records the restarted coordinator meanwhile (py-spy, raw
format), ``--pyspy-client FILE`` the first client process. The restart's timeline is
printed per second from the kill, with each agent's backoff when the coordinator listened
again, its first welcome and its first ack after it. Either mode reports, per second from
the kill, how many connection attempts the agents' backoff made (``wanted``), how many
began past the client's gate (at most ``--connecting`` at once per client process; 0: no
gate, every agent connects when its backoff says) and how many were welcomed; and how many
attempts timed out (an agent gives up a connection not welcomed within
:data:`HANDSHAKE_TIMEOUT_S`, as the daemon's link does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT / "tests")  # as bench/link.py: support.* and the packages
sys.path.insert(1, str(ROOT))

from support.fakenvml import build  # noqa: E402
from support.postgres import PostgresCluster, find_bin  # noqa: E402

from agent.link.connection import LinkConfig, Session, retry  # noqa: E402
from agent.link.identity import Identity  # noqa: E402
from agent.protocol import crypto, dsse  # noqa: E402
from agent.protocol.bodies import UnitStatus  # noqa: E402
from agent.protocol.errors import ProtocolError  # noqa: E402
from agent.protocol.limits import MAX_FRAME_BYTES  # noqa: E402
from agent.protocol.messages import (  # noqa: E402
    COORDINATOR_SENDS,
    Ack,
    AttestRequest,
    EnvelopeBody,
    NodeStatusBody,
    ProfileBody,
    decode_frame,
    encode_frame,
    encode_reliable,
)
from agent.protocol.reliable import ReliableReceiver  # noqa: E402
from agent.protocol.session import AgentHandshake  # noqa: E402
from bench.link import CAPTURE, GPUS, CoordinatorProcess, KiB, telemetry_body  # noqa: E402
from coordinator.collector import keep_frozen  # noqa: E402
from hal.backend import HalConfig  # noqa: E402
from hal.profile import take_profile  # noqa: E402

#: Handshakes in flight per client process (``--connecting``): below the listen backlog.
CONNECTING = 64
#: The daemon's link gives up a connection not open, or a handshake not welcomed, within
#: this long (``agent.link.connection``), and backs off.
HANDSHAKE_TIMEOUT_S = 10.0


class SimAgent:
    """One simulated daemon: its key, its two streams, reconnecting as the real link does.

    What it must deliver is numbered as the daemon's outbox numbers it, connected or not: a
    telemetry batch every ``interval`` at the agent's own phase of the clock (the daemon's
    sampler goes on while the link is down), a profile and a ``node_status`` answering an
    ``attest_request``. One sender sends what is numbered, in order, from where the
    coordinator's ``welcome`` says it stored, as the link's does.
    """

    def __init__(
        self,
        url: str,
        pinned: dict[str, bytes],
        body: bytes,
        interval: float,
        profile: dict[str, Any],
        *,
        telemetry: bool = True,
        digest: str | None = None,
    ) -> None:
        self.url, self.pinned, self.body, self.interval = url, pinned, body, interval
        self.profile = profile
        self.telemetry = telemetry
        """False: no telemetry; back once welcomed (and its profile acked, when asked)."""
        self.digest = digest
        """The profile's digest, named in ``hello`` as the daemon's link does (None: not)."""
        self.identity = Identity.from_private_key(crypto.generate_private_key())
        self.config = LinkConfig(url=url, pinned_keys=pinned)
        self.receiver = ReliableReceiver()
        self.next_seq = 1
        self.kinds: dict[int, str] = {}
        """Unacknowledged seq -> its kind (the outbox)."""
        self._bodies: dict[int, str] = {}
        """The frames of unacknowledged messages other than telemetry (built once)."""
        self.sent: dict[int, float] = {}
        """Unacknowledged seq -> when it was (last) sent, perf_counter."""
        self.sent_upto = 0
        """The last seq sent on this connection."""
        self.wakeup = asyncio.Event()
        """Set when a message is numbered: the sender looks at once."""
        self.latencies: list[float] = []
        self.ready = asyncio.Event()
        """Set when profile and node_status are acknowledged."""
        self.back_at: float | None = None
        """Wall time of the first telemetry ack (without telemetry: the welcome, or the
        profile's ack when one was asked) after the last reconnect."""
        self.wanted: list[float] = []
        """Wall time of each connection attempt as the backoff chose it (before the gate)."""
        self.began: list[float] = []
        """Wall time of each connection attempt (past the client's gate)."""
        self.welcomed: list[float] = []
        """Wall time of each ``welcome``."""
        self.timeouts: list[float] = []
        """Wall time of each attempt given up after :data:`HANDSHAKE_TIMEOUT_S`."""
        self.failed: list[tuple[float, str]] = []
        """Wall time and error of each attempt that failed (a timeout, refused, reset...)."""
        self.delays: list[tuple[float, int, float]] = []
        """Wall time, failures in a row and the delay the backoff chose after each attempt."""
        self.reconnected = False
        self.errors = 0
        self.disconnects = 0
        self.progressed = False
        """The coordinator acknowledged something on this connection (:func:`retry`)."""
        self.phase = random.uniform(0, interval)

    async def run(self, gate: asyncio.Semaphore | contextlib.nullcontext[None]) -> None:
        """Stay connected (the real link's retry policy), streaming telemetry."""
        producing = asyncio.create_task(self._produce())
        try:
            await self._connect(gate)
        finally:
            producing.cancel()

    async def _connect(self, gate: asyncio.Semaphore | contextlib.nullcontext[None]) -> None:
        failures = 0
        while True:
            welcomed_at: float | None = None
            self.progressed = False
            self.wanted.append(time.time())
            try:
                async with gate:
                    self.began.append(time.time())
                    ws = await connect(
                        self.url, max_size=MAX_FRAME_BYTES, open_timeout=HANDSHAKE_TIMEOUT_S
                    )
                    try:
                        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                            await self._handshake(ws)
                    except BaseException:
                        await ws.close()
                        raise
                welcomed_at = time.monotonic()
                self.welcomed.append(time.time())
                async with ws:
                    await self._session(ws)
            except (OSError, ConnectionClosed, InvalidHandshake, ProtocolError) as exc:
                if isinstance(exc, TimeoutError):
                    self.timeouts.append(time.time())
                if welcomed_at is None:
                    self.failed.append((time.time(), type(exc).__name__))
            if welcomed_at is not None:
                self.disconnects += 1
            lived = 0.0 if welcomed_at is None else time.monotonic() - welcomed_at
            failures, delay = retry(
                failures, Session(welcomed_at is not None, lived, self.progressed), self.config
            )
            self.delays.append((time.time(), failures, delay))
            await asyncio.sleep(delay)

    async def _produce(self) -> None:
        """A telemetry batch every interval at the agent's phase, connected or not."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self.phase
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            due += self.interval
            if self.ready.is_set() and self.telemetry:
                self._number("telemetry", None)

    def _number(self, kind: str, body: bytes | None) -> None:
        """Number a message, as the outbox does, and wake the sender."""
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        self.kinds[seq] = kind
        if body is not None:
            self._bodies[seq] = encode_reliable(kind, seq, body)
        self.wakeup.set()

    async def _handshake(self, ws: ClientConnection) -> None:
        identity = self.identity
        handshake = AgentHandshake(
            node_id=identity.node_id,
            public_key=identity.public_key,
            sign=lambda data: crypto.sign(identity.private_key, data),
            verify=crypto.verify,
            pinned_keys=self.pinned,
            agent_version="bench",
            nonce=crypto.b64encode(secrets.token_bytes(32)),
            last_coordinator_seq=self.receiver.last_seq,
            now=time.monotonic(),
            profile_digest=self.digest,
        )
        while handshake.welcome is None:
            for message in handshake.messages_to_send():
                await ws.send(encode_frame(message))
            handshake.receive(decode_frame(await ws.recv()), time.monotonic())
        self.receiver.resume()
        # What the coordinator stored is acked; the rest goes again, in order, from there.
        stored = handshake.welcome.last_agent_seq
        self._acked(stored, record=False)
        self.sent_upto = stored

    def _frame(self, seq: int) -> str:
        kind = self.kinds[seq]
        if kind == "telemetry":
            return encode_reliable("telemetry", seq, self.body)
        return self._bodies[seq]

    async def _send_pending(self, ws: ClientConnection) -> None:
        """Send what is numbered past what was sent, in order, then wait for more."""
        while True:
            self.wakeup.clear()
            while self.sent_upto < self.next_seq - 1:
                seq = self.sent_upto = self.sent_upto + 1
                if seq in self.kinds:
                    self.sent[seq] = time.perf_counter()
                    await ws.send(self._frame(seq))
            await self.wakeup.wait()

    def _acked(self, upto: int, *, record: bool) -> bool:
        """Forget what ``upto`` acknowledges; whether that makes the agent back."""
        now = time.perf_counter()
        back = False
        for seq in [s for s in self.kinds if s <= upto]:
            sent = self.sent.pop(seq, None)
            kind = self.kinds.pop(seq)
            self._bodies.pop(seq, None)
            if kind == "telemetry":
                back = True
                if record and sent is not None:
                    self.latencies.append(now - sent)
            elif kind == "profile" and not self.telemetry:
                back = True
        return back

    async def _session(self, ws: ClientConnection) -> None:
        """Send what is numbered; answer attest requests (and send node_status once)."""
        status_sent = self.ready.is_set() or "node_status" in self.kinds.values()
        if self.welcomed[:-1]:  # a reconnect: back at its first ack (or now, without telemetry)
            self.reconnected = True
            # Without telemetry, a node that names its digest is back once welcomed (and
            # its profile acked, should the coordinator ask: below).
            self.back_at = time.time() if not self.telemetry and self.digest else None
        sending = asyncio.create_task(self._send_pending(ws))
        try:
            async for raw in ws:
                message = decode_frame(raw, accept=COORDINATOR_SENDS)
                if isinstance(message, Ack):
                    # Kept on the agent, as the link does: a session ends in an exception.
                    self.progressed = True
                    if self._acked(message.body.seq, record=True) and self.back_at is None:
                        self.back_at = time.time()
                    if not self.ready.is_set() and status_sent and not self.kinds:
                        self.ready.set()
                elif isinstance(message, AttestRequest):
                    if self.receiver.receive(message):
                        if not self.telemetry:  # asked: back once the profile is acked
                            self.back_at = None
                        self._number("profile", self._profile(message.body.nonce))
                        if not status_sent:
                            status_sent = True
                            self._number("node_status", _NODE_STATUS)
                    if (ack := self.receiver.take_ack()) is not None:
                        await ws.send(encode_frame(ack))
                else:
                    self.errors += 1
        finally:
            sending.cancel()

    def _profile(self, nonce: str) -> bytes:
        identity = self.identity
        envelope = dsse.attest_profile(
            self.profile, nonce, identity.node_id, identity.private_key, identity.key_id
        )
        body = ProfileBody(attestation=msgspec.convert(msgspec.to_builtins(envelope), EnvelopeBody))
        return msgspec.json.encode(body)


def real_profile(work: Path) -> bytes:
    """A real profile of the host and 8 fake-NVML A5000s (~8 KB of JSON), as the daemon's."""
    capture = build.replicate(build.parse_capture(CAPTURE), GPUS)
    library = build.build_library(capture, work / "nvml-profile")
    profile = take_profile(HalConfig(nvml_library=str(library), backends=("nvml",)))
    return msgspec.json.encode(profile)


def per_second(times: list[float], since: float) -> dict[str, float]:
    """How many of ``times`` fall in each second after ``since``: peak, median, seconds."""
    counts: dict[int, int] = {}
    for t in times:
        if t >= since:
            counts[int(t - since)] = counts.get(int(t - since), 0) + 1
    if not counts:
        return {"peak": 0, "median": 0, "seconds": 0}
    spread = [counts.get(i, 0) for i in range(min(counts), max(counts) + 1)]
    return {"peak": max(spread), "median": statistics.median(spread), "seconds": len(spread)}


_NODE_STATUS = msgspec.json.encode(
    NodeStatusBody(
        available=True, units=[UnitStatus(id=f"gpu{i}", health="healthy") for i in range(8)]
    )
)


# ---------------------------------------------------------------- client process


def timeline(fleet: list[SimAgent], killed: float, listening: float) -> dict[str, Any]:
    """Where each agent's restart went: per second from the kill, the attempts that failed
    (by error), the welcomes and the agents back; and per agent, the backoff in effect when
    the coordinator listened again (failures in a row, and how long after it the next
    attempt came), its first welcome after that, and its first ack after the welcome."""
    failed: dict[str, list[int]] = {}
    for a in fleet:
        for t, error in a.failed:
            if t >= killed:
                failed.setdefault(error, []).append(int(t - killed))
    failures_at: list[int] = []
    next_attempt: list[float] = []
    first_welcome: list[float] = []
    back_after_welcome: list[float] = []
    for a in fleet:
        # Since the kill only: an agent that had not yet seen its connection end had none.
        chosen = [d for d in a.delays if killed <= d[0] <= listening]
        failures_at.append(chosen[-1][1] if chosen else -1)
        after = [t for t in a.wanted if t >= listening]
        next_attempt.append(after[0] - listening if after else -1.0)
        welcomes = [t for t in a.welcomed if t >= listening]
        first_welcome.append(welcomes[0] - killed if welcomes else -1.0)
        if welcomes and a.back_at is not None:
            back_after_welcome.append(a.back_at - welcomes[-1])
    return {
        "failed_at": failed,
        "failures_at_listening": failures_at,
        "next_attempt_after_listening": next_attempt,
        "first_welcome_after_kill": first_welcome,
        "back_after_welcome": back_after_welcome,
    }


async def client(
    url: str,
    pinned_hex: str,
    work: str,
    agents: int,
    interval: float,
    *,
    connecting: int,
    digest: bool,
) -> None:
    """A client process: ``agents`` agents; commands on stdin, reports on stdout.

    ``interval`` 0: no telemetry (``--handshakes-only``); ``connecting`` 0: no gate;
    ``digest``: each agent names its profile's digest in ``hello``, as the daemon does.
    """
    pinned = {k: bytes.fromhex(v) for k, v in json.loads(pinned_hex).items()}
    body = (Path(work) / "telemetry.json").read_bytes()
    profile = msgspec.json.decode((Path(work) / "profile.json").read_bytes())
    named = dsse.profile_digest(profile) if digest else None  # as the daemon: once
    fleet = [
        SimAgent(url, pinned, body, interval or 10.0, profile, telemetry=interval > 0, digest=named)
        for _ in range(agents)
    ]
    gate = asyncio.Semaphore(connecting) if connecting else contextlib.nullcontext()
    # This process stands for thousands of agents, each a process of its own with a small
    # heap: a collection here walking all of them would stall every agent of the process at
    # once, and the pause would count as the coordinator's latency. Kept out of the
    # collector's sight as the coordinator keeps its sessions.
    frozen = asyncio.create_task(keep_frozen(freeze_every_s=1.0))
    tasks = [asyncio.create_task(a.run(gate)) for a in fleet]
    await asyncio.gather(*(a.ready.wait() for a in fleet))
    print(json.dumps({"event": "ready"}), flush=True)
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        if line == "mark":
            for a in fleet:
                a.latencies.clear()
                a.errors = a.disconnects = 0
            print(json.dumps({"event": "marked"}), flush=True)
        elif line == "report":
            latencies = [x for a in fleet for x in a.latencies]
            errors = sum(a.errors for a in fleet)
            disconnects = sum(a.disconnects for a in fleet)
            print(json.dumps({"event": "report", "latencies": latencies, "errors": errors,
                              "disconnects": disconnects}), flush=True)  # fmt: skip
        elif line.startswith("back "):  # "back <seconds> <since> <listening>": all back, or
            _, timeout, since, listening = line.split()  # the deadline
            asked = float(since)
            deadline = time.monotonic() + float(timeout)
            while time.monotonic() < deadline and not all(
                a.reconnected and a.back_at is not None for a in fleet
            ):
                await asyncio.sleep(0.1)
            back = [a.back_at for a in fleet if a.reconnected and a.back_at is not None]
            wanted = [t for a in fleet for t in a.wanted if t >= asked]
            began = [t for a in fleet for t in a.began if t >= asked]
            timeouts = [t for a in fleet for t in a.timeouts if t >= asked]
            failed: dict[str, int] = {}
            for t, error in (f for a in fleet for f in a.failed):
                if t >= asked:
                    failed[error] = failed.get(error, 0) + 1
            welcomed = [t for a in fleet for t in a.welcomed if t >= asked]
            print(json.dumps({"event": "back", "at": max(back, default=0.0),
                              "missing": len(fleet) - len(back), "wanted": wanted, "began": began,
                              "timeouts": timeouts, "failed": failed,
                              "welcomed": welcomed,
                              **timeline(fleet, asked, float(listening))}), flush=True)  # fmt: skip
    for task in [*tasks, frozen]:
        task.cancel()
    await asyncio.gather(*tasks, frozen, return_exceptions=True)


# ---------------------------------------------------------------- the driver


class Clients:
    """The client processes, driven by lines on their stdin."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(
        self,
        coordinator: CoordinatorProcess,
        work: Path,
        agents: int,
        args: argparse.Namespace,
        interval: float,
    ) -> None:
        procs = args.procs
        pinned = json.dumps({k: v.hex() for k, v in coordinator.pinned.items()})
        for i in range(procs):
            share = agents // procs + (1 if i < agents % procs else 0)
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--client",
                    coordinator.url,
                    pinned,
                    str(work),
                    str(share),
                    str(interval),
                    str(args.connecting),
                    "0" if args.no_digest else "1",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    limit=1 << 28,  # a report holds every latency: lines of megabytes
                )
            )

    async def ask(self, command: str | None, event: str) -> list[dict[str, Any]]:
        """Send ``command`` to every client; their answers (each ``event``)."""
        if command is not None:
            for p in self.procs:
                assert p.stdin is not None
                p.stdin.write(command.encode() + b"\n")
        answers = []
        for p in self.procs:
            assert p.stdout is not None
            line = await p.stdout.readline()
            answer = json.loads(line)
            assert answer["event"] == event, answer
            answers.append(answer)
        return answers

    async def stop(self) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in self.procs:
            await p.wait()


async def stop(coordinator: CoordinatorProcess) -> None:
    """SIGTERM until it exits: one that comes while its loop is far behind can be lost (the
    loop's wakeup socket is full, and asyncio's handler never hears of it), and the run
    would wait for ever."""
    assert coordinator.process is not None
    while True:
        coordinator.process.terminate()
        try:
            async with asyncio.timeout(15):
                await coordinator.process.wait()
                return
        except TimeoutError:
            print("the coordinator did not stop on SIGTERM: again", flush=True)


def listen_overflows() -> int:
    """Connections the kernel dropped from a full accept queue, machine-wide (Linux; 0
    elsewhere): each costs its client a SYN retransmitted 1, 3, 7, 15, 31 s later."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        fields = dict(zip(names.split(), values.split(), strict=False))
        if "ListenOverflows" in fields:
            return int(fields["ListenOverflows"])
    return 0


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def one_run(
    work: Path,
    run_dir: Path,
    args: argparse.Namespace,
    agents: int,
    cluster: PostgresCluster | None,
) -> dict[str, float]:
    """One fleet of ``agents``: connect, steady window, restart (on a fresh database of
    ``cluster``'s, with ``--postgres``)."""
    # A fleet enrolling at once: far more new keys per second than the default's 5. At
    # 10,000 agents the default store cap (4 GiB) is 73 s of raw telemetry: the cap is
    # sized for the run, so that what is measured is not its eviction.
    options = ("--new-keys-per-s", str(args.new_keys_per_s), "--store-max-mib", "65536")
    db = None if cluster is None else cluster.create_database()
    coordinator = CoordinatorProcess(run_dir, options, db)
    await coordinator.start()
    assert coordinator.process is not None
    clients = Clients()
    interval = 0.0 if args.handshakes_only else args.interval
    figures: dict[str, float] = {"agents": agents}
    try:
        start = time.perf_counter()
        await clients.start(coordinator, work, agents, args, interval)
        await clients.ask(None, "ready")
        figures["connect_s"] = time.perf_counter() - start
        if not args.handshakes_only:
            figures.update(await steady(coordinator, clients, args, cluster))
            print("steady", json.dumps(figures), flush=True)  # kept should the restart hang
        figures["load_avg_1m"] = os.getloadavg()[0]
        overflows = listen_overflows()
        killed = time.time()
        coordinator.process.send_signal(signal.SIGKILL)
        await coordinator.process.wait()
        await coordinator.start()
        figures["restart_listening_s"] = time.time() - killed
        pid = coordinator.process.pid
        cpu0 = cpu_s(pid)
        # The client without stopping it 100 times a second (--nonblocking): its agents'
        # timing is part of what is measured.
        spied = (
            (pid, args.pyspy, ()),
            (clients.procs[0].pid, args.pyspy_client, ("--nonblocking",)),
        )
        record = (args.pyspy_bin, "record", "-r", "100", "-f", "raw", "--threads")
        spies = [
            subprocess.Popen([*record, *more, "-p", str(p), "-o", out], stdout=subprocess.DEVNULL)
            for p, out, more in spied
            if out
        ]
        listening = killed + figures["restart_listening_s"]
        answers = await clients.ask(f"back {args.restart_timeout} {killed} {listening}", "back")
        figures["restart_cpu_s"] = cpu_s(pid) - cpu0
        figures["restart_listen_overflows"] = listen_overflows() - overflows
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            await asyncio.to_thread(spy.wait)
        figures["restart_load_avg_1m"] = os.getloadavg()[0]
    finally:
        await clients.stop()
        await stop(coordinator)
    missing = sum(r["missing"] for r in answers)
    # Not all back by the deadline: the figure is the deadline (and how many missed it).
    back = killed + args.restart_timeout if missing else max(r["at"] for r in answers)
    figures["restart_all_back_s"] = back - killed
    figures["restart_missing"] = missing
    # CPU from listening to all back, per agent that came back: what one reconnect costs.
    figures["restart_cpu_ms_per_agent"] = 1e3 * figures["restart_cpu_s"] / max(1, agents - missing)
    figures["restart_timeouts"] = sum(len(r["timeouts"]) for r in answers)
    failed: dict[str, int] = {}
    for r in answers:
        for error, n in r["failed"].items():
            failed[error] = failed.get(error, 0) + n
    print("failed attempts since the kill", json.dumps(failed), flush=True)
    figures.update(report_timeline(answers, killed))
    for kind in ("wanted", "began", "welcomed"):
        rate = per_second([t for r in answers for t in r[kind]], killed)
        figures[f"{kind}_per_s_peak"] = rate["peak"]
        figures[f"{kind}_per_s_median"] = rate["median"]
    return figures


def report_timeline(answers: list[dict[str, Any]], killed: float) -> dict[str, float]:
    """Print the restart's timeline (per second from the kill); its figures: when the
    agents' next attempts came after the coordinator listened, when each was first
    welcomed, when its first ack followed."""
    seconds: dict[str, dict[int, int]] = {}
    for kind in ("wanted", "welcomed"):
        for t in (t for r in answers for t in r[kind]):
            seconds.setdefault(kind, {})
            second = int(t - killed)
            seconds[kind][second] = seconds[kind].get(second, 0) + 1
    for r in answers:
        for error, at in r["failed_at"].items():
            for second in at:
                counts = seconds.setdefault(error, {})
                counts[second] = counts.get(second, 0) + 1
    last = max((max(c) for c in seconds.values() if c), default=0)
    print("s " + " ".join(f"{kind:>12}" for kind in seconds), flush=True)
    for second in range(last + 1):
        row = " ".join(f"{seconds[kind].get(second, 0):12d}" for kind in seconds)
        print(f"{second:<2} {row}", flush=True)

    def spread(name: str) -> dict[str, float]:
        values = sorted(v for r in answers for v in r[name] if v >= 0)
        if not values:
            return {}
        return {
            f"{name}_p50": statistics.median(values),
            f"{name}_p99": values[int(0.99 * (len(values) - 1))],
            f"{name}_max": values[-1],
        }

    failures = [f for r in answers for f in r["failures_at_listening"]]
    by_failures = {n: failures.count(n) for n in sorted(set(failures))}
    print(
        "agents by failures in a row when the coordinator listened (-1: its connection's end"
        " not seen yet)",
        by_failures,
        flush=True,
    )
    return {
        **spread("next_attempt_after_listening"),
        **spread("first_welcome_after_kill"),
        **spread("back_after_welcome"),
    }


async def steady(
    coordinator: CoordinatorProcess,
    clients: Clients,
    args: argparse.Namespace,
    cluster: PostgresCluster | None,
) -> dict[str, float]:
    """The steady window: ack latency, the coordinator's CPU and RSS (and the database
    server's CPU, on PostgreSQL), errors."""
    assert coordinator.process is not None
    await asyncio.sleep(args.interval)  # every agent past its first batch
    await clients.ask("mark", "marked")
    pid = coordinator.process.pid
    db_pids = [] if cluster is None else cluster.pids()
    db_cpu0 = sum(_cpu_or_0(p) for p in db_pids)
    cpu0, t0, rss = cpu_s(pid), time.perf_counter(), coordinator.rss()
    load = os.getloadavg()[0]
    while time.perf_counter() - t0 < args.duration:
        await asyncio.sleep(1)
        rss = max(rss, coordinator.rss())
    elapsed = time.perf_counter() - t0
    cpu = (cpu_s(pid) - cpu0) / elapsed
    db_cpu = (sum(_cpu_or_0(p) for p in db_pids) - db_cpu0) / elapsed
    reports = await clients.ask("report", "report")
    latencies = sorted(x for r in reports for x in r["latencies"])
    return {
        "ack_p50_ms": 1e3 * statistics.median(latencies),
        "ack_p99_ms": 1e3 * statistics.quantiles(latencies, n=100)[98],
        "ack_max_ms": 1e3 * latencies[-1],
        "acks": len(latencies),
        "cpu_cores": cpu,
        "rss_mib": rss / (KiB * KiB),
        "errors": sum(r["errors"] for r in reports),
        "disconnects": sum(r["disconnects"] for r in reports),
        "steady_load_avg_1m": load,
        **({"db_cpu_cores": db_cpu} if cluster is not None else {}),
    }


def _cpu_or_0(pid: int) -> float:
    """A server process's CPU seconds (0 once it has exited: a backend of a closed
    connection, whose CPU is then not counted)."""
    try:
        return cpu_s(pid)
    except psutil.NoSuchProcess:
        return 0.0


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Every fleet size, ``--runs`` times each; min/median/max of each figure."""
    results: dict[str, Any] = {}
    (ROOT / "build").mkdir(exist_ok=True)
    # A real disk: fsync counts. --keep leaves the databases for a look afterwards.
    with contextlib.ExitStack() as stack:
        if args.keep:
            tmp = tempfile.mkdtemp(dir=ROOT / "build")
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(dir=ROOT / "build"))
        work = Path(tmp)
        body = await asyncio.to_thread(telemetry_body, work / "nvml")
        (work / "telemetry.json").write_bytes(body)
        (work / "profile.json").write_bytes(await asyncio.to_thread(real_profile, work))
        cluster = None
        if args.postgres:
            bin_dir = find_bin()
            if bin_dir is None:
                raise SystemExit("--postgres: no /usr/lib/postgresql/*/bin/postgres")
            cluster = PostgresCluster(bin_dir, durable=True)
            stack.callback(cluster.stop)
        for agents in args.agents:
            runs = []
            for i in range(args.runs):
                run_dir = work / f"{agents}-{i}"
                runs.append(await one_run(work, run_dir, args, agents, cluster))
                if not args.keep:  # ~25 GB a run at 10,000 agents: the disk would fill
                    shutil.rmtree(run_dir)
            for run in runs:
                print(agents, json.dumps(run), flush=True)
            results[str(agents)] = {
                key: {
                    "min": min(r[key] for r in runs),
                    "median": statistics.median(r[key] for r in runs),
                    "max": max(r[key] for r in runs),
                }
                for key in runs[0]
            }
    return results


def main() -> None:
    """Run the load and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", default="1000,5000,10000", help="fleet sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=1, help="runs of each size")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--interval", type=float, default=10.0, help="s between an agent's batches")
    parser.add_argument("--duration", type=float, default=30.0, help="s of the steady window")
    parser.add_argument("--new-keys-per-s", type=float, default=1000.0, help="serve's option")
    parser.add_argument(
        "--restart-timeout", type=float, default=300.0, help="s to wait for all to be back"
    )
    parser.add_argument("--keep", action="store_true", help="keep the databases under build/")
    parser.add_argument(
        "--postgres", action="store_true",
        help="the store on a PostgreSQL server of the bench's own (Debian's postgresql, fsync"
        " on), a fresh database a run; its CPU is reported beside the coordinator's",
    )  # fmt: skip
    parser.add_argument(
        "--handshakes-only", action="store_true",
        help="no telemetry: only the restart's reconnects, and their CPU per agent",
    )  # fmt: skip
    parser.add_argument("--pyspy", help="py-spy record (raw) the restarted coordinator to FILE")
    parser.add_argument(
        "--pyspy-client", help="py-spy record (raw) the first client process to FILE meanwhile"
    )
    parser.add_argument("--pyspy-bin", default="py-spy", help="the py-spy executable")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "coordinator_load.json"))
    parser.add_argument(
        "--connecting", type=int, default=CONNECTING,
        help="handshakes in flight per client process (0: no limit)",
    )  # fmt: skip
    parser.add_argument(
        "--no-digest", action="store_true",
        help="the agents name no profile digest in hello (older agents): every reconnect"
        " attests again",
    )  # fmt: skip
    parser.add_argument("--client", nargs=7, help=argparse.SUPPRESS)  # a client process
    args = parser.parse_args()
    if args.client is not None:
        url, pinned, body, agents, interval, connecting, digest = args.client
        asyncio.run(
            client(
                url,
                pinned,
                body,
                int(agents),
                float(interval),
                connecting=int(connecting),
                digest=digest == "1",
            )
        )
        return
    args.agents = [int(n) for n in args.agents.split(",")]
    results = asyncio.run(bench(args))
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for agents, figures in results.items():
        for key, value in figures.items():
            low, mid, high = value["min"], value["median"], value["max"]
            print(f"{agents:>6} {key:20} {low:10.2f} {mid:10.2f} {high:10.2f}")


if __name__ == "__main__":
    main()
