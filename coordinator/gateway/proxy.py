"""One client request through the gateway: key, rate, model, replica, answer, record.

A request of a model goes to a ready replica (:mod:`coordinator.gateway.routing`) over a
tunnel stream (:mod:`coordinator.gateway.upstream`), one kept alive from an earlier
request when the replica has one idle (:mod:`coordinator.gateway.pool`; if its server
closed it meanwhile, the request goes on a new stream). One that fails before any byte of
the service's answer came (the node refused the stream, its connection went, the server
reset or closed it) is tried once more on another replica: nothing reached the client.
Once the answer started, a failure ends the client's answer: a stream gets an error
event, then the connection closes; any other body is cut short (the client sees a
truncated answer, never a hang).

With every replica of the model at its ``max_streams``, a request waits up to
``queue_timeout_s`` for one to free (a burst is absorbed; a token stream lasts seconds),
then is refused ``replicas_busy`` (503, ``Retry-After: 1``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

import h11
import msgspec

from coordinator.errors import GatewayError, StreamError
from coordinator.gateway import answers
from coordinator.gateway.client_conn import ClientConnection, ClientGone
from coordinator.gateway.limits import RateLimits, bearer, retry_after
from coordinator.gateway.peer import PeerAuth
from coordinator.gateway.peer_stream import PeerStream
from coordinator.gateway.pool import StreamPool
from coordinator.gateway.records import RecordWriter
from coordinator.gateway.replicas import ReplicaView
from coordinator.gateway.routing import Full, Replica, Router
from coordinator.gateway.tables import ApiKey, ApiKeyTable, RequestRecord
from coordinator.gateway.upstream import Upstream
from coordinator.gateway.usage import Usage, UsageReader
from coordinator.tunnel import Tunnels, TunnelStream

__all__ = ["UNKNOWN_KEYS_PER_MIN", "Proxy", "Timeouts"]

#: Unknown API keys one source may send a minute (a minute's worth at once) where each
#: costs a lookup in a shared store: past it, its requests are refused unread a while.
UNKNOWN_KEYS_PER_MIN: Final = 600

_JSON = ("content-type", "application/json")
#: How often a request waiting for a busy replica looks again (a new replica may be ready).
_RECHECK_S = 0.5
#: A record's path, at most: a route is shorter; a client's 404s keep no 16 KiB heads.
_RECORDED_PATH_CHARS = 256


class Timeouts(msgspec.Struct, frozen=True, kw_only=True):
    """How long the gateway waits on a service, and how much it takes from one."""

    first_byte_s: float = 300.0
    """For the answer's head (a long prompt is read before the first token)."""
    idle_s: float = 120.0
    """Between two pieces of the answer."""
    queue_s: float = 2.0
    """For a free replica when every one is at its ``max_streams``."""
    max_response_bytes: int = 1 << 30


class _Request(msgspec.Struct, kw_only=True):
    """What is known of a request so far: its record in the making."""

    method: str
    path: str
    started: float
    key_id: str = ""
    model: str = ""
    node_id: str = ""
    job_id: str = ""
    status: int = 0
    code: str = ""
    stream: bool = False
    attempts: int = 0
    usage: Usage = msgspec.field(default_factory=Usage)
    ttfb_s: float | None = None
    ttft_s: float | None = None


class _Retry(Exception):
    """The replica failed before any byte of its answer: try another."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Proxy:
    """Answers the gateway's requests."""

    def __init__(
        self,
        *,
        keys: ApiKeyTable,
        view: ReplicaView,
        tunnels: Tunnels,
        records: RecordWriter,
        timeouts: Timeouts,
        peer_auth: PeerAuth | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = Router()
        self.pool = StreamPool()
        """Idle kept-alive streams to the replicas."""
        self._keys = keys
        self._view = view
        self._tunnels = tunnels
        self._peer_auth = peer_auth
        self._records = records
        self._timeouts = timeouts
        self._clock = clock
        self._monotonic = monotonic
        self._rates = RateLimits()
        self._unknown_keys = RateLimits()
        """Per source: the unknown keys it sent (on a shared store, each a lookup)."""
        self._freed: asyncio.Future[None] | None = None

    async def handle(
        self, request: h11.Request, client: ClientConnection, source: str = ""
    ) -> None:
        """Answer one request whose head was read, from ``source`` (:func:`.caps.source_of`):
        the key first, then the body (the client may be gone: then it is cancelled)."""
        path = request.target.decode("latin-1").split("?", 1)[0]
        state = _Request(
            method=request.method.decode("latin-1"), path=path, started=self._monotonic()
        )
        try:
            await self._serve(request, client, state, source)
        except GatewayError as exc:
            state.status, state.code = answers.error_body(exc)[0], exc.code
            await self._refuse(client, exc)
        except (asyncio.CancelledError, ClientGone):
            # A client gone keeps the status it was answered (if any); an answer broken
            # off has its code already.
            state.status = state.status or 499
            state.code = state.code or "client_gone"
            raise
        finally:
            if state.key_id:
                self._record(state)

    async def _serve(
        self, request: h11.Request, client: ClientConnection, state: _Request, source: str
    ) -> None:
        headers = {n.decode("latin-1"): v.decode("latin-1") for n, v in request.headers}
        token = bearer(headers.get("authorization"))
        key = None if token is None else self._find(token, source)
        if key is None or key.revoked is not None:
            raise GatewayError("invalid_api_key", "send Authorization: Bearer <a valid API key>")
        state.key_id = key.key_id
        if self._keys.shared:  # one rate over every coordinator's gateway
            wait = self._keys.take_rate(key.key_id, key.rate_per_min, self._clock())
        else:
            wait = self._rates.admit(key.key_id, key.rate_per_min, self._monotonic())
        if wait > 0:
            raise GatewayError(
                "rate_limited", f"{key.rate_per_min} requests a minute", retry_after_s=wait
            )
        # Only a known key's body is read: nobody else makes the gateway hold 8 MiB.
        body = await client.read_body()
        if state.path == "/v1/models":
            if state.method != "GET":
                raise GatewayError("method_not_allowed", "GET /v1/models")
            models = sorted({m for r in self._view.current().ready for m in r.models})
            state.status = 200
            await client.answer(200, [_JSON], answers.models_body(models))
            return
        if state.path not in answers.ROUTES:
            raise GatewayError("not_found", f"no route {state.path!r}")
        if state.method != "POST":
            raise GatewayError("method_not_allowed", f"POST {state.path}")
        asked = answers.read_model(body)
        state.model, state.stream = asked.model, asked.stream
        if asked.model not in self._view.current().models:
            raise GatewayError("model_not_found", f"no service serves {asked.model!r}")
        await client.guarded(self._route(asked.model, body, client, state))

    def _find(self, token: str, source: str) -> ApiKey | None:
        """The key ``token`` is. On a store other coordinators share, each lookup is a
        round trip to its server, on the loop: a source that sent more than
        :data:`UNKNOWN_KEYS_PER_MIN` unknown keys lately is refused ``rate_limited``
        unread until its budget refills (its valid keys with them: a client with a key
        does not guess others)."""
        if not self._keys.shared:
            return self._keys.find(token)
        now = self._monotonic()
        if self._unknown_keys.spent(source, now):
            raise GatewayError(
                "rate_limited",
                f"over {UNKNOWN_KEYS_PER_MIN} unknown API keys a minute from this address",
                retry_after_s=60.0 / UNKNOWN_KEYS_PER_MIN,
            )
        key = self._keys.find(token)
        if key is None:
            self._unknown_keys.admit(source, UNKNOWN_KEYS_PER_MIN, now)
        return key

    async def _route(
        self, model: str, body: bytes, client: ClientConnection, state: _Request
    ) -> None:
        """To a replica, and once more to another if the first failed before answering."""
        tried: set[str] = set()
        failure = ""
        while len(tried) < 2:
            replica = await self._slot(model, tried, failure)
            tried.add(replica.job_id)
            state.node_id, state.job_id, state.attempts = (
                replica.node_id,
                replica.job_id,
                len(tried),
            )
            try:
                await self._exchange(replica, body, client, state)
                return
            except _Retry as exc:
                failure = exc.detail
            finally:
                self._release(replica.job_id)
        raise GatewayError("upstream_error", f"two replicas failed; the last: {failure}")

    async def _slot(self, model: str, tried: set[str], failure: str) -> Replica:
        """A replica of ``model`` not tried yet, counted in flight."""
        deadline = self._monotonic() + self._timeouts.queue_s
        while True:
            ready = self._view.current().ready
            self.pool.prune({r.job_id for r in ready})
            choice = self.router.pick(ready, model, tried)
            if isinstance(choice, Replica):
                return choice
            if choice is Full.NONE:
                if tried:
                    raise GatewayError("upstream_error", f"the replica failed: {failure}")
                raise GatewayError("no_ready_replica", f"no replica of {model!r} is ready")
            left = deadline - self._monotonic()
            if left <= 0:
                raise GatewayError(
                    "replicas_busy", f"every replica of {model!r} is busy", retry_after_s=1.0
                )
            if self._freed is None or self._freed.done():
                self._freed = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(min(left, _RECHECK_S)):
                    await asyncio.shield(self._freed)
            except TimeoutError:
                pass

    def _release(self, job_id: str) -> None:
        self.router.release(job_id)
        if self._freed is not None and not self._freed.done():
            self._freed.set_result(None)

    async def _exchange(
        self, replica: Replica, body: bytes, client: ClientConnection, state: _Request
    ) -> None:
        """One exchange with the replica, on a kept-alive stream if one is idle: if that
        one fails before any byte of its answer (its server closed it meanwhile), once
        more on a new stream; a new stream failing so is for another replica."""
        upstream = self.pool.take(replica.job_id)
        head = None
        if upstream is not None:
            try:
                head = await self._ask(upstream, replica, body, state)
            except _Retry:
                pass  # its server closed it while it was idle: a new stream, below
            finally:
                if head is None:
                    upstream.close()
        if head is None:
            try:
                upstream = Upstream(await self._open(replica))
            except StreamError as exc:
                raise _Retry(exc.code) from None
        assert upstream is not None
        kept = False
        try:
            if head is None:
                head = await self._ask(upstream, replica, body, state)
            state.ttfb_s = self._monotonic() - state.started
            await self._relay(head, upstream, client, state)
            if upstream.reusable:
                upstream.next_cycle()
                self.pool.put(replica.job_id, upstream)
                kept = True
            else:
                await upstream.finish()
        finally:
            if not kept:
                upstream.close_unless_over()

    async def _open(self, replica: Replica) -> TunnelStream | PeerStream:
        """A new stream to the replica: through our tunnel, or its holder's (a peer).

        Raises:
            StreamError: none could be opened (nothing reached the service).
        """
        if not replica.via:
            return self._tunnels.open(replica.node_id, replica.job_id)
        if self._peer_auth is None:
            raise StreamError("no_tunnel", f"{replica.node_id}: its tunnel is elsewhere")
        return await PeerStream.open(replica.via, replica.node_id, replica.job_id, self._peer_auth)

    async def _ask(
        self, upstream: Upstream, replica: Replica, body: bytes, state: _Request
    ) -> h11.Response:
        """Send the request, and read the answer's head.

        Raises:
            _Retry: the stream failed before any byte of the answer.
            GatewayError: ``upstream_error`` after some; ``upstream_timeout``.
        """
        try:
            # The request's sending too: a service that reads nothing holds it up.
            async with asyncio.timeout(self._timeouts.first_byte_s):
                await upstream.request(state.method, state.path, replica.job_id, body)
                return await upstream.response()
        except StreamError as exc:
            if upstream.received:
                raise GatewayError("upstream_error", f"the stream: {exc.code}") from None
            raise _Retry(exc.code) from None
        except GatewayError as exc:
            if upstream.received:
                raise
            raise _Retry(exc.detail) from None
        except TimeoutError:
            raise GatewayError(
                "upstream_timeout", f"no answer in {self._timeouts.first_byte_s:g} s"
            ) from None

    async def _relay(
        self, head: h11.Response, upstream: Upstream, client: ClientConnection, state: _Request
    ) -> None:
        """Pass the service's answer on, piece by piece, reading its usage as it goes."""
        kept = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in head.headers}
        content_type = kept.get("content-type", "application/octet-stream")
        sse = content_type.startswith("text/event-stream")
        headers = [("content-type", content_type), ("cache-control", "no-store")]
        if "content-length" in kept:
            headers.append(("content-length", kept["content-length"]))
        state.status = head.status_code
        await client.start(head.status_code, headers)
        reader = UsageReader(stream=sse)
        sent, cap = 0, self._timeouts.max_response_bytes
        try:
            async for piece in upstream.body(self._timeouts.idle_s):
                if sent + len(piece) > cap:
                    # The bytes up to the cap are passed on: the client gets that much.
                    await client.send(piece[: cap - sent])
                    raise GatewayError("response_too_large", f"the answer passed {cap} bytes")
                sent += len(piece)
                if reader.feed(piece):
                    state.ttft_s = self._monotonic() - state.started
                await client.send(piece)
        except GatewayError as exc:
            state.code = exc.code
            state.usage = reader.finish()
            if sse:
                await client.send(answers.error_event(exc))
            raise ClientGone(f"the answer broke off: {exc.code}") from None
        state.usage = reader.finish()
        await client.end()

    async def _refuse(self, client: ClientConnection, exc: GatewayError) -> None:
        if not client.can_answer:
            return
        status, body = answers.error_body(exc)
        headers = [_JSON]
        if exc.code == "invalid_api_key":
            headers.append(("www-authenticate", "Bearer"))
        if exc.retry_after_s is not None:
            headers.append(("retry-after", retry_after(exc.retry_after_s)))
        await client.answer(status, headers, body)

    def _record(self, state: _Request) -> None:
        self._records.add(
            RequestRecord(
                at=self._clock(),
                key_id=state.key_id,
                method=state.method,
                path=state.path[:_RECORDED_PATH_CHARS],
                model=state.model,
                node_id=state.node_id,
                job_id=state.job_id,
                status=state.status,
                code=state.code,
                stream=state.stream,
                attempts=state.attempts,
                tokens_in=state.usage.tokens_in,
                tokens_out=state.usage.tokens_out,
                latency_s=self._monotonic() - state.started,
                ttfb_s=state.ttfb_s,
                ttft_s=state.ttft_s,
            )
        )
