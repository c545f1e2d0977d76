"""The ``[service]`` table of a spec whose ``kind`` is ``"service"``: a server that runs
until its lease ends, reached only through the agent (docs/services.md).

The container listens on ``port`` on a network of its own with no route out; the agent
probes ``readiness`` until the server answers (for up to ``start_allowance_s``: a model
may take minutes to load), then ``liveness`` while it runs, and restarts it by
``restart`` when it dies or stops answering. ``models`` are the names a gateway routes
requests by (the ``model`` of an OpenAI-style request).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = ["HttpCheck", "RestartPolicy", "ServiceSpec"]

# An absolute request path of printable ASCII, no spaces: it goes into a request line.
_Path = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^/[\x21-\x7e]*(?!\n)$")]
_Model = Annotated[
    str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*(?!\n)$")
]


class HttpCheck(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An HTTP GET the agent sends the server: a 2xx answer within ``timeout_s`` passes;
    ``failures`` in a row fail the check."""

    path: _Path = "/health"
    interval_s: Annotated[float, Meta(ge=0.1, le=3600)] = 5.0
    timeout_s: Annotated[float, Meta(ge=0.1, le=600)] = 2.0
    failures: Annotated[int, Meta(ge=1, le=100)] = 3


class RestartPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a server that died or stopped answering comes back: after ``backoff_s``,
    doubled at each restart up to ``max_backoff_s``; after ``limit`` restarts it stops."""

    limit: Annotated[int, Meta(ge=0, le=100)] = 5
    backoff_s: Annotated[float, Meta(ge=0, le=3600)] = 1.0
    max_backoff_s: Annotated[float, Meta(ge=0, le=86400)] = 60.0


class ServiceSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A server's port, health checks, restarts and lease."""

    port: Annotated[int, Meta(ge=1, le=65535)]
    models: Annotated[list[_Model], Meta(min_length=1, max_length=16)]
    readiness: HttpCheck = msgspec.field(default_factory=lambda: HttpCheck(interval_s=1.0))
    start_allowance_s: Annotated[float, Meta(ge=1, le=86400)] = 600.0
    """How long the server may take to become ready the first time (and after a restart)."""
    liveness: HttpCheck = msgspec.field(default_factory=HttpCheck)
    restart: RestartPolicy = msgspec.field(default_factory=RestartPolicy)
    lease_s: Annotated[float, Meta(ge=10, le=30 * 86400)] = 3600.0
    """How long it may run unless the coordinator renews the lease."""
    max_streams: Annotated[int, Meta(ge=1, le=256)] = 64
    """Requests in flight at most; the gateway sends no more. At most what a node's tunnel
    holds open at once (``agent.protocol.tunnel.MAX_STREAMS``, for all its services)."""
