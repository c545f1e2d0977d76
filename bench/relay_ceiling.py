"""What a relay can reach: a plain HTTP answer read by curl straight from its server, and
through two relay hops that copy its bytes through user space, splice them, or copy and mask
them, side by side in one run (issue 13: would a relay that does not copy reach 0.8x?).

Processes on loopback, each its own: the service (tests/support/tunnel_target.py's server;
``GET /bytes/N`` answers N bytes and closes), two relay hops (the "agent", which reaches the
service, and the "coordinator", which a client reaches; the coordinator keeps one data
connection open to the agent, as the tunnel's, and the agent frames each chunk of an answer
with a header, length and stream id, that the coordinator strips), and the client, ``curl
-s -o /dev/null``. The ways, alternating within each run (the order turned each run):

- direct: curl -> service;
- copy: blocking sockets, ``recv_into`` 512 KiB and ``sendall`` in a loop (the fastest
  Python relay of a stream: no event loop, no copy but the kernel's two per hop);
- splice: ``os.splice`` through a pipe (``F_SETPIPE_SZ`` 1 MiB where allowed): the agent
  splices what the service sent (at most 512 KiB) into the pipe, writes the header, splices
  the pipe on; the coordinator reads the header, splices exactly its length into its pipe
  and on to curl: no byte of an answer enters user space;
- mask: as copy, the agent masking each chunk as an RFC 6455 client does (a fresh 4-byte
  key in the header, ``websockets.speedups.apply_mask``), the coordinator unmasking it.

Each way's MiB/s by curl's ``time_total`` and its ratio to the run's direct figure, the CPU
time (user + system) of every process per 64 MiB (service, agent, coordinator, curl), wall
time, the 1-minute load average, and TCP segments sent per 64 MiB (``OutSegs``, ACKs
included, of the whole network namespace: run under ``unshare -n`` to count only the
bench's); min/median/max over runs, printed and written to
``bench/results/relay_ceiling.json``. Each way is checked first: a 3 MiB and a bit answer
through it equals the service's. Nothing asserted of the figures. Run with
``python bench/relay_ceiling.py --runs N --mib M [--pipe BYTES]`` (under the bench lock).

Figures (2 cores, kernel 6.18, loopback MTU 64 KiB, load 2.2-2.7 with other
tests beside; ``--runs 7 --mib 1024``, two sets, and a set of 5 under ``unshare -n``),
medians of each set: direct 4136, 3812, 4417 MiB/s at 0.025-0.027 s of CPU per 64 MiB
(all processes: at 4 GB/s that is 1.6 of the 2 cores); copy 1703, 1716, 1938 MiB/s, 0.41,
0.42, 0.44x, 0.056-0.066 s (agent 0.019-0.023, coordinator 0.014-0.017); splice 1361,
1209, 1371 MiB/s, 0.35, 0.37, 0.37x (runs from 573 to 1672 MiB/s), 0.067-0.081 s; mask
1636, 1546, 1837 MiB/s, 0.39, 0.37, 0.42x, 0.061-0.069 s (the agent's masking 0.003 s
per 64 MiB). Splice with 64 KiB pipes: 971 MiB/s, 0.27x, 0.10 s. So no relay of two hops
reaches 0.8x here, copying or not: direct is already CPU-bound, each hop adds a loopback
TCP connection whose sender does its receiver's protocol work too, and the copies splice
saves are a small part of that. Splice costs more than it saves on loopback: the pages it
passes on stay referenced until curl reads them, so the service's sends no longer reuse
their warm page fragment and copy into cold memory (perf: the service's copy in
``tcp_sendmsg`` 26% of all samples under splice; under copy, that of all three Python
processes 6%), curl reads cold pages (0.018-0.021 s against 0.011-0.012), and some runs
send more, smaller segments (up to 7,570 per 64 MiB against 4,200).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import resource
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
from websockets.speedups import apply_mask

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT / "tests")

from support.stats import spread  # noqa: E402
from support.tunnel_target import pattern  # noqa: E402

__all__ = ["main"]

MiB = 1 << 20
CHUNK = 512 << 10
#: A frame's header: its payload's length (0 ends the stream) and the stream's id; the mask
#: way adds the 4-byte masking key.
HEADER = struct.Struct("!II")
MASKED = struct.Struct("!II4s")
WAYS = ("direct", "copy", "splice", "mask")
RELAYS = WAYS[1:]
_TARGET = str(ROOT / "tests" / "support" / "tunnel_target.py")  # the service


def _exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes read from ``sock``."""
    data = sock.recv(size, socket.MSG_WAITALL)
    if len(data) != size:
        raise ConnectionError(f"{len(data)} of {size} bytes before the end")
    return data


def _pipe(size: int) -> tuple[int, int]:
    """A pipe, grown to ``size`` bytes where the system allows it."""
    read, write = os.pipe()
    # Over /proc/sys/fs/pipe-max-size, unprivileged: EPERM, and the default 64 KiB stays.
    with contextlib.suppress(PermissionError):
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, size)
    return read, write


def _drain(pipe: int, out: int, size: int) -> None:
    """``size`` bytes the pipe holds spliced on to ``out``."""
    while size:
        size -= os.splice(pipe, out, size, flags=os.SPLICE_F_MOVE)


def _agent_stream(
    way: str, service: socket.socket, data: socket.socket, stream: int, pipe: int
) -> None:
    """The service's answer, to its end, framed on the data connection."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    read, write = _pipe(pipe) if way == "splice" else (-1, -1)
    try:
        while True:
            if way == "splice":
                size = os.splice(service.fileno(), write, CHUNK, flags=os.SPLICE_F_MOVE)
            else:
                size = service.recv_into(buffer)
            if not size:
                break
            if way == "mask":
                key = secrets.token_bytes(4)
                data.sendall(MASKED.pack(size, stream, key), socket.MSG_MORE)
                data.sendall(apply_mask(view[:size], key))
            else:
                # MSG_MORE: the header leaves in one segment with the payload that follows.
                data.sendall(HEADER.pack(size, stream), socket.MSG_MORE)
                if way == "splice":
                    _drain(read, data.fileno(), size)
                else:
                    data.sendall(view[:size])
        end = MASKED.pack(0, stream, b"\0" * 4) if way == "mask" else HEADER.pack(0, stream)
        data.sendall(end)
    finally:
        if way == "splice":
            os.close(read)
            os.close(write)


def _agent(way: str, service_port: int, listener: socket.socket, pipe: int) -> None:
    """The agent's hop: each request framed on the data connection sent to the service, its
    answer framed back."""
    data, _ = listener.accept()
    while head := data.recv(HEADER.size, socket.MSG_WAITALL):
        size, stream = HEADER.unpack(head)
        request = _exactly(data, size)
        with socket.create_connection(("127.0.0.1", service_port)) as service:
            service.sendall(request)
            _agent_stream(way, service, data, stream, pipe)


def _coordinator_stream(
    way: str, data: socket.socket, client: socket.socket, stream: int, pipe: int
) -> None:
    """One answer's frames, stripped, on to the client, to the stream's end."""
    header = MASKED if way == "mask" else HEADER
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    read, write = _pipe(pipe) if way == "splice" else (-1, -1)
    try:
        while True:
            size, of, *key = header.unpack(_exactly(data, header.size))
            if of != stream:
                raise ConnectionError(f"a frame of stream {of} in stream {stream}")
            if not size:
                return
            at = 0
            while at < size:
                if way == "splice":
                    moved = os.splice(data.fileno(), write, min(size - at, pipe))
                    if not moved:
                        raise ConnectionError("the data connection closed in a frame")
                    _drain(read, client.fileno(), moved)
                else:
                    moved = data.recv_into(buffer, min(size - at, CHUNK))
                    if not moved:
                        raise ConnectionError("the data connection closed in a frame")
                    if way == "mask":
                        turn = at % 4  # the key turned to this piece's offset in the frame
                        turned = key[0][turn:] + key[0][:turn]
                        client.sendall(apply_mask(view[:moved], turned))
                    else:
                        client.sendall(view[:moved])
                at += moved
    finally:
        if way == "splice":
            os.close(read)
            os.close(write)


def _coordinator(way: str, agent_port: int, listener: socket.socket, pipe: int) -> None:
    """The coordinator's hop: each client's request head to the agent as a stream of the one
    data connection, and the stream's answer back."""
    data = socket.create_connection(("127.0.0.1", agent_port))
    for stream in range(1, 1 << 31):
        client, _ = listener.accept()
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                if not (more := client.recv(1 << 16)):
                    break
                head += more
            data.sendall(HEADER.pack(len(head), stream) + head)
            _coordinator_stream(way, data, client, stream, pipe)


def _hop(role: str, way: str, port: int, pipe: int) -> None:
    """One relay hop's process: prints its port, serves until killed."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    (_agent if role == "agent" else _coordinator)(way, port, listener, pipe)


def _start(*args: str) -> tuple[subprocess.Popen[bytes], int]:
    """A process of this bench's and the port it prints first."""
    process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def _cpu(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """CPU seconds (user + system) of each process, and of the children waited for."""
    spent = {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {**spent, "curl": done.ru_utime + done.ru_stime}


def _segments() -> int:
    """TCP segments sent in this network namespace so far (``OutSegs``)."""
    names, values = (
        line.split()
        for line in Path("/proc/net/snmp").read_text().splitlines()
        if line.startswith("Tcp:")
    )
    return int(values[names.index("OutSegs")])


def _curl(url: str, out: str = "/dev/null") -> tuple[int, float]:
    """Bytes and seconds of curl reading ``url`` to its end."""
    command = ["curl", "-s", "-S", "--fail", "-o", out, "-w", "%{size_download} %{time_total}"]
    done = subprocess.run([*command, url], capture_output=True, check=True)
    size, took = done.stdout.decode().split()
    return int(size), float(took)


def main(runs: int, mib: int, pipe: int) -> dict[str, object]:
    """The figures of ``runs`` runs of ``mib`` MiB each way, the splice way's pipes of
    ``pipe`` bytes."""
    target, service_port = _start(sys.executable, _TARGET)
    hops: list[subprocess.Popen[bytes]] = []
    ports, watched = {"direct": service_port}, {"direct": {"service": psutil.Process(target.pid)}}
    try:
        for way in RELAYS:
            me = (sys.executable, str(Path(__file__).resolve()), "--way", way, "--pipe", str(pipe))
            agent, agent_port = _start(*me, "--hop", "agent", "--port", str(service_port))
            coordinator, ports[way] = _start(*me, "--hop", "coordinator", "--port", str(agent_port))
            hops += [agent, coordinator]
            watched[way] = {
                "service": watched["direct"]["service"],
                "agent": psutil.Process(agent.pid),
                "coordinator": psutil.Process(coordinator.pid),
            }
        size = 3 * MiB + 12345
        path = f"/bytes/{size}"
        with tempfile.TemporaryDirectory() as tmp:
            for way, port in ports.items():  # each way's answer is the service's, exactly
                _curl(f"http://127.0.0.1:{port}{path}", f"{tmp}/{way}")
                answer = Path(f"{tmp}/{way}").read_bytes()
                assert answer == pattern(size, seed=len(path)), f"{way}: the answer differs"
        figures: dict[str, dict[str, list[float]]] = {way: {} for way in WAYS}
        for run in range(runs):
            for way in WAYS[run % len(WAYS) :] + WAYS[: run % len(WAYS)]:
                before, load, sent = _cpu(watched[way]), os.getloadavg()[0], _segments()
                got, took = _curl(f"http://127.0.0.1:{ports[way]}/bytes/{mib * MiB}")
                after, sent = _cpu(watched[way]), _segments() - sent
                assert got == mib * MiB, f"{way}: {got} bytes"
                row = figures[way]
                row.setdefault("mib_s", []).append(mib / took)
                row.setdefault("wall_s", []).append(took)
                row.setdefault("load_1min", []).append(load)
                row.setdefault("segments_per_64mib", []).append(sent * 64 / mib)
                for name, spent in after.items():
                    row.setdefault(f"cpu_s_per_64mib_{name}", []).append(
                        (spent - before[name]) * 64 / mib
                    )
    finally:
        for hop in hops:
            hop.kill()
            hop.wait()
        assert target.stdin is not None
        target.stdin.close()
        target.wait()
    results: dict[str, object] = {"runs": runs, "mib": mib, "chunk": CHUNK, "pipe": pipe}
    for way, row in figures.items():
        ratio = [a / b for a, b in zip(row["mib_s"], figures["direct"]["mib_s"], strict=True)]
        results[way] = {"over_direct": spread(ratio)} | {k: spread(v) for k, v in row.items()}
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--pipe", type=int, default=1 << 20, help="the splice pipes' bytes")
    parser.add_argument("--hop", choices=("agent", "coordinator"), help=argparse.SUPPRESS)
    parser.add_argument("--way", choices=RELAYS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hop:
        _hop(args.hop, args.way, args.port, args.pipe)
        sys.exit()
    results = main(args.runs, args.mib, args.pipe)
    text = json.dumps(results, indent=2)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "relay_ceiling.json").write_text(text + "\n")
