"""The agent<->coordinator link under hostile or unlucky conditions.

Real coordinators on 127.0.0.1:0 with real SQLite files; the agent side is the
protocol-speaking test peer (coordinator_peer.py), the daemon's own link, or the job
manager on the real Docker engine.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
from support.coordinator_peer import Peer, connected
from support.world import World, deliver, offer_message, spec
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from agent.link.connection import Link, LinkConfig, Session, retry
from agent.link.identity import Identity
from agent.link.outbox import Outbox
from agent.protocol import crypto
from agent.protocol.errors import AuthError, DecodeError
from agent.protocol.jobs import Offer
from agent.protocol.messages import (
    COORDINATOR_SENDS,
    Ack,
    AckBody,
    AttestRequestBody,
    Error,
    JobStatusBody,
    Message,
    TelemetryBody,
    Welcome,
    decode_frame,
    encode_frame,
    error_message,
    wrap,
)
from agent.protocol.session import AgentHandshake, CoordinatorHandshake, HandshakeState, NonceBook
from coordinator.server import Coordinator, Settings
from coordinator.store import Store


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    server = Coordinator(
        db_path=tmp_path / "coordinator.db",
        state_dir=tmp_path / "state",
        settings=Settings(handshake_timeout_s=5.0),
    )
    async with server:
        yield server


def _pinned(coordinator: Coordinator) -> dict[str, bytes]:
    return {coordinator.key.key_id: coordinator.key.public_key}


async def _recv(ws: ClientConnection) -> Message:
    async with asyncio.timeout(10):
        return decode_frame(await ws.recv(), accept=COORDINATOR_SENDS)


async def _until_closed(ws: ClientConnection) -> list[Message]:
    """Everything received until the connection closes."""
    seen: list[Message] = []
    while True:
        try:
            seen.append(await _recv(ws))
        except ConnectionClosed:
            return seen


async def _handshake(ws: ClientConnection, coordinator: Coordinator, peer: Peer) -> Welcome | Error:
    """Run the agent's handshake; the welcome, or the error the coordinator answered."""
    hs = AgentHandshake(
        node_id=peer.node_id,
        public_key=peer.public_key,
        sign=lambda data: crypto.sign(peer.key, data),
        verify=crypto.verify,
        pinned_keys=_pinned(coordinator),
        agent_version="0.1.0",
        nonce=crypto.b64encode(secrets.token_bytes(32)),
        last_coordinator_seq=0,
        now=time.time(),
    )
    while hs.state is not HandshakeState.OPEN:
        for message in hs.messages_to_send():
            await ws.send(encode_frame(message))
        answer = await _recv(ws)
        if isinstance(answer, Error):
            return answer
        hs.receive(answer, time.time())
    assert hs.welcome is not None
    return Welcome(v=1, body=hs.welcome)


class Contender:
    """One of several connections of the same node racing to be its session."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.acked: list[int] = []
        """The seqs of its own telemetry the coordinator acknowledged."""
        self.errors: list[str] = []
        self.close_code: int | None = None

    async def run(self, coordinator: Coordinator, peer: Peer, go: asyncio.Event) -> None:
        """Handshake; once welcomed, send three telemetry batches marked with its index."""
        async with connect(coordinator.url) as ws:
            try:
                await go.wait()
                welcome = await _handshake(ws, coordinator, peer)
                if isinstance(welcome, Error):
                    self.errors.append(welcome.body.code)
                    await _recv(ws)  # the close that follows the error
                    return
                first = welcome.body.last_agent_seq + 1
                for seq in range(first, first + 3):
                    samples = [{"t": float(seq), "contender": self.index}]
                    await ws.send(encode_frame(wrap(TelemetryBody(samples=samples), seq)))
                while len(self.acked) < 3:
                    message = await _recv(ws)
                    if isinstance(message, Ack) and message.body.seq >= first:
                        self.acked.append(message.body.seq)
                    elif isinstance(message, Error):
                        self.errors.append(message.body.code)
                    # The coordinator's own stream is left unacknowledged: the contenders
                    # share no view of it, and each hello says it has stored nothing.
            except ConnectionClosed:
                pass
            finally:
                self.close_code = ws.close_code


async def test_racing_handshakes_of_one_node_leave_one_session_and_lose_nothing_acked(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    for _ in range(3):
        go = asyncio.Event()
        contenders = [Contender(i) for i in range(4)]
        tasks = [asyncio.create_task(c.run(coordinator, peer, go)) for c in contenders]
        await asyncio.sleep(0)  # every contender's socket is opening
        go.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)
        # Whoever was replaced was told so, with a code, and closed normally; nobody saw
        # the coordinator fail (1011) or got another error.
        for contender in contenders:
            assert set(contender.errors) <= {"superseded"}, contender.errors
            assert contender.close_code in (None, 1000), contender.close_code
        # Every ack is for what the store holds from that very contender.
        stored = {
            m.seq: m.body for m in coordinator.store.nodes.messages(peer.node_id, "telemetry")
        }
        for contender in contenders:
            for seq in contender.acked:
                assert stored[seq]["samples"][0]["contender"] == contender.index
        seqs = coordinator.store.nodes.all_seqs(peer.node_id)
        assert seqs == list(range(1, len(seqs) + 1))
    # After all that, the node connects once more and is served normally.
    async with connected(coordinator.url, _pinned(coordinator), peer) as link:
        peer.last_seq = link.welcome.body.last_agent_seq
        await link.send(TelemetryBody(samples=[]))
        assert coordinator.connected() == {peer.node_id}


async def test_the_old_session_is_told_and_closed_before_the_new_one_is_welcomed(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    pinned = _pinned(coordinator)
    async with connected(coordinator.url, pinned, peer) as old:
        async with connected(coordinator.url, pinned, peer) as new:
            # The old agent has answered the close already: the coordinator sends welcome
            # only once the closing handshake of the old session is over.
            assert old.ws.state in (State.CLOSING, State.CLOSED)
            assert coordinator.connected() == {peer.node_id}
            peer.last_seq = new.welcome.body.last_agent_seq
            assert await new.send(TelemetryBody(samples=[])) == 1
        messages = await _until_closed(old.ws)
    assert [m.body.code for m in messages if isinstance(m, Error)] == ["superseded"]
    assert old.ws.close_code == 1000


def test_a_duplicate_node_seq_is_a_no_op_in_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    try:
        store.nodes.seen("node-a", "key", 1.0)
        status = JobStatusBody(job_id="job-1", state="refused", code="busy")
        assert store.add("node-a", 1, "job_status", {"first": True}, 1.0, job=status) == "stored"
        again = store.add("node-a", 1, "job_status", {"second": True}, 2.0, job=status)
        assert again == "duplicate"
        assert [m.body for m in store.nodes.messages("node-a", "job_status")] == [{"first": True}]
    finally:
        store.close()


# ------------------------------------------------------------------ binary frames


async def test_binary_frame_gets_a_coded_error_and_the_session_goes_on(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    async with connected(coordinator.url, _pinned(coordinator), peer) as link:
        await link.ws.send(encode_frame(wrap(TelemetryBody(samples=[]), 1)).encode())
        answer = await _recv(link.ws)
        while not isinstance(answer, Error):  # the attest_request comes first
            answer = await _recv(link.ws)
        assert answer.body.code == "binary_frame"
        assert await link.send(TelemetryBody(samples=[])) == 1
    assert coordinator.store.nodes.all_seqs(peer.node_id) == [1]


async def test_binary_frame_during_the_handshake_is_refused_and_closed(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    hs = AgentHandshake(
        node_id=peer.node_id,
        public_key=peer.public_key,
        sign=lambda data: crypto.sign(peer.key, data),
        verify=crypto.verify,
        pinned_keys=_pinned(coordinator),
        agent_version="0.1.0",
        nonce=crypto.b64encode(secrets.token_bytes(32)),
        last_coordinator_seq=0,
        now=time.time(),
    )
    async with connect(coordinator.url) as ws:
        await ws.send(encode_frame(hs.messages_to_send()[0]).encode())
        answer = await _recv(ws)
        with pytest.raises(ConnectionClosed):
            await _recv(ws)
    assert isinstance(answer, Error)
    assert answer.body.code == "binary_frame"
    assert ws.close_code == 1008
    assert coordinator.store.nodes.get(peer.node_id) is None


# ------------------------------------------------------------------ the daemon's link

FAKE_KEY = crypto.generate_private_key()
FAKE_PUB = crypto.public_key_bytes(FAKE_KEY)
FAKE_ID = crypto.key_id(FAKE_PUB)
INITIAL_S = 0.01

Script = Callable[[ServerConnection, int], Awaitable[None]]


async def _welcome(ws: ServerConnection, hello: str | bytes | None = None) -> None:
    """The coordinator's real handshake, up to ``welcome``, with the fake's key (from
    ``hello`` when it was read already)."""
    hs = CoordinatorHandshake(
        key_id=FAKE_ID,
        sign=lambda data: crypto.sign(FAKE_KEY, data),
        verify=crypto.verify,
        node_id_of=crypto.node_id,
        nonces=NonceBook(),
        new_nonce=lambda: crypto.b64encode(secrets.token_bytes(32)),
    )
    while hs.state is not HandshakeState.AUTHENTICATED:
        frame, hello = (await ws.recv() if hello is None else hello), None
        hs.receive(decode_frame(frame), time.time())
        for message in hs.messages_to_send():
            await ws.send(encode_frame(message))
    hs.accept(session_id="s-1", last_agent_seq=0, heartbeat_s=15.0, telemetry_interval_s=1.0)
    for message in hs.messages_to_send():
        await ws.send(encode_frame(message))


@asynccontextmanager
async def fake_coordinator(script: Script) -> AsyncIterator[str]:
    """A websocket server that runs ``script(ws, n)`` for its n-th connection; its URL."""
    count = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal count
        count += 1
        await script(ws, count - 1)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/agent"


@asynccontextmanager
async def running_link(
    tmp_path: Path, url: str, profile_digest: str | None = None
) -> AsyncIterator[Link]:
    """The daemon's link to ``url``, with an empty outbox, until the block ends."""

    async def handler(message: Message) -> None:
        return None

    config = LinkConfig(
        url=url,
        pinned_keys={FAKE_ID: FAKE_PUB},
        backoff_initial_s=INITIAL_S,
        backoff_max_s=1.0,
        healthy_after_s=3600.0,  # only progress makes a session count as one that worked
    )
    identity = Identity.from_private_key(crypto.generate_private_key())
    with Outbox.open(tmp_path / "outbox.db") as outbox:
        link = Link(config, identity, outbox, handler, "0.1.0", profile_digest=profile_digest)
        stop = asyncio.Event()
        task = asyncio.create_task(link.run(stop))
        try:
            yield link
        finally:
            stop.set()
            await task


async def test_the_link_answers_a_binary_frame_with_a_coded_error(tmp_path: Path) -> None:
    answers: asyncio.Queue[Message] = asyncio.Queue()

    async def script(ws: ServerConnection, n: int) -> None:
        await _welcome(ws)
        await ws.send(encode_frame(Ack(v=1, body=AckBody(seq=0))).encode())
        answers.put_nowait(decode_frame(await ws.recv()))
        await ws.wait_closed()

    async with fake_coordinator(script) as url, running_link(tmp_path, url):
        async with asyncio.timeout(10):
            answer = await answers.get()
    assert isinstance(answer, Error)
    assert answer.body.code == "binary_frame"


async def test_a_coordinator_older_than_the_profile_digest_gets_hellos_without_it(
    tmp_path: Path,
) -> None:
    # Agents upgraded before their coordinator: it refuses the unknown field, as its
    # strict decoding does, and the link goes on without it rather than never connecting.
    hellos: list[dict[str, object]] = []

    async def old_coordinator(ws: ServerConnection, n: int) -> None:
        hello = await ws.recv()
        body = msgspec.json.decode(hello)["body"]
        hellos.append(body)
        if "profile_digest" in body:
            detail = "Object contains unknown field `profile_digest` - at `$.body`"
            await ws.send(encode_frame(error_message(DecodeError("bad_message", detail))))
            await ws.close()
            return
        await _welcome(ws, hello)
        await ws.wait_closed()

    digest = "sha256:" + "ab" * 32
    async with (
        fake_coordinator(old_coordinator) as url,
        running_link(tmp_path, url, digest) as link,
    ):
        async with asyncio.timeout(10):
            await link.connected.wait()
    assert ["profile_digest" in hello for hello in hellos] == [True, False]
    assert link.profile_digest is None


def test_retry_starts_again_after_a_session_that_worked() -> None:
    config = LinkConfig(url="ws://x", pinned_keys={}, backoff_initial_s=1.0, backoff_max_s=30.0)

    def ceiling(failures: int, session: Session) -> tuple[int, float]:
        return retry(failures, session, config, jitter=lambda low, high: high)

    never = Session(welcomed=False, lived_s=0.0, progressed=False)
    assert ceiling(0, never) == (1, 2.0)
    assert ceiling(3, never) == (4, 16.0)
    assert ceiling(9, never) == (10, 30.0)  # capped
    # Welcomed, then cut short with nothing done: still a failure.
    assert ceiling(9, Session(welcomed=True, lived_s=1.0, progressed=False)) == (10, 30.0)
    # Welcomed and useful, or welcomed and long-lived: however it ended, start again.
    assert ceiling(9, Session(welcomed=True, lived_s=0.1, progressed=True)) == (0, 1.0)
    assert ceiling(9, Session(welcomed=True, lived_s=10.0, progressed=False)) == (0, 1.0)
    # Equal jitter: between half the ceiling and the ceiling.
    low = retry(0, never, config, jitter=lambda low, high: low)
    assert low == (1, 1.0)


async def test_the_delay_after_a_welcomed_session_that_ended_in_an_error_is_the_first_one(
    tmp_path: Path,
) -> None:
    delays: list[float] = []
    done = asyncio.Event()
    links: list[Link] = []

    async def script(ws: ServerConnection, n: int) -> None:
        delays.append(links[0].next_delay_s)  # the delay the link waited before this attempt
        if n < 3:  # refused: failures pile up
            await ws.recv()
            await ws.send(encode_frame(error_message(AuthError("not_admitted", "not yet"))))
        elif n == 3:  # welcomed; the coordinator then dies mid-session, as under kill -9
            await _welcome(ws)
            await ws.send(encode_frame(Ack(v=1, body=AckBody(seq=0))))
            await ws.recv()  # the agent's telemetry
            await ws.send(encode_frame(Ack(v=1, body=AckBody(seq=1))))
            nonce = crypto.b64encode(secrets.token_bytes(32))
            await ws.send(encode_frame(wrap(AttestRequestBody(nonce=nonce), 1)))
            # The agent acknowledges the request: it has handled both frames, in order.
            while not isinstance(decode_frame(await ws.recv()), Ack):
                pass
            ws.transport.abort()
        else:
            done.set()

    async with fake_coordinator(script) as url, running_link(tmp_path, url) as link:
        links.append(link)
        link.outbox.append("telemetry", b'{"samples":[]}', time.time())
        async with asyncio.timeout(30):
            await done.wait()
    assert delays[3] > INITIAL_S  # after three refusals: backed off
    assert delays[4] <= INITIAL_S  # after the session that worked: the first delay again


# ------------------------------------------------------------------ forged offers


@pytest.mark.parametrize("forgery", ["tampered", "untrusted_key"])
async def test_a_forged_offer_does_not_use_up_the_id_of_the_genuine_one(
    world: World,
    forgery: str,
) -> None:
    genuine = offer_message(world, "job-x", spec(world.image, "echo genuine"))
    if forgery == "tampered":
        forged = Offer(
            job_id="job-x",
            node_id=world.identity.node_id,
            spec=spec(world.image, "echo forged"),
            issued_at=0,
            expires_at=time.time() + 600,
        )
        envelope = msgspec.structs.replace(
            genuine.body.offer, payload=crypto.b64encode(msgspec.json.encode(forged))
        )
        body = msgspec.structs.replace(genuine.body, offer=envelope)
        first = msgspec.structs.replace(genuine, body=body)
        code = "bad_signature"
    else:
        first = offer_message(
            world, "job-x", spec(world.image, "echo forged"), key=crypto.generate_private_key()
        )
        code = "untrusted_key"
    # In the coordinator's stream the forgery comes first, the genuine offer right after.
    first = msgspec.structs.replace(first, seq=1)
    genuine = msgspec.structs.replace(genuine, seq=2)
    await deliver(world, first)
    assert [b["code"] for _, b in world.messages("job-x")] == [code]
    assert world.ledger.get("job-x") is None  # nothing recorded under the unverified id
    await deliver(world, genuine)
    await world.manager.wait_idle()
    assert world.states("job-x") == ["refused", "accepted", "running", "completed"]
    assert world.log("job-x") == "genuine\n"
