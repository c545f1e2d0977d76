"""``/metrics``: the daemon's state in the Prometheus text format, served on loopback only.

The exposition is text format 0.0.4 (prometheus.io/docs/instrumenting/exposition_formats):
one ``# HELP`` and one ``# TYPE`` line per family, then its samples. The daemon hands in a
``MetricsInput`` per scrape; unknown readings (a GPU without a temperature sensor) are left
out rather than reported as 0. Off unless the daemon starts a ``MetricsServer``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Final, Literal

import msgspec

from agent.control.wire import StatusView
from agent.errors import ConfigError

__all__ = [
    "CONTENT_TYPE",
    "Family",
    "GpuMetrics",
    "MetricsInput",
    "MetricsServer",
    "exposition",
    "families",
    "render",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_log = logging.getLogger(__name__)
_METRIC_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_MAX_REQUEST_HEAD: Final = 8 * 1024
_REQUEST_TIMEOUT_S: Final = 5.0


class GpuMetrics(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One GPU's readings; None where the GPU does not report one."""

    uuid: str
    index: int
    name: str
    vendor: str
    healthy: bool
    assigned: bool = False
    temperature_c: float | None = None
    utilization_ratio: float | None = None


class MetricsInput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What one scrape shows.

    Attributes:
        jobs_total: jobs that ended, by final state; counts only go up (a restart of
            the agent may start them from 0 again, which Prometheus handles).
    """

    agent_version: str
    node_id: str
    connected: bool
    paused: bool = False
    draining: bool = False
    outbox_depth: int = 0
    jobs_running: int = 0
    jobs_total: dict[str, int] = {}
    gpus: list[GpuMetrics] = []

    @classmethod
    def from_status(cls, status: StatusView, jobs_total: Mapping[str, int]) -> MetricsInput:
        """The metrics of a control API status, with the job counts the status lacks."""
        return cls(
            agent_version=status.agent_version,
            node_id=status.node_id,
            connected=status.connection == "connected",
            paused=status.paused,
            draining=status.draining,
            outbox_depth=status.outbox_depth,
            jobs_running=len(status.jobs),
            jobs_total=dict(jobs_total),
            gpus=[
                GpuMetrics(
                    uuid=gpu.uuid,
                    index=gpu.index,
                    name=gpu.name,
                    vendor=gpu.vendor,
                    healthy=gpu.health == "healthy",
                    assigned=gpu.assigned_job is not None,
                    temperature_c=gpu.temperature_c,
                    utilization_ratio=(
                        None if gpu.utilization_pct is None else gpu.utilization_pct / 100
                    ),
                )
                for gpu in status.gpus
            ],
        )


class Family(msgspec.Struct, frozen=True):
    """A metric family: its name, help text, type, and samples (labels, value)."""

    name: str
    help: str
    type: Literal["gauge", "counter"]
    samples: list[tuple[dict[str, str], float]]


def families(metrics: MetricsInput) -> list[Family]:
    """The families of ``gpu_agent_*`` metrics for one scrape."""
    gpus = metrics.gpus

    def per_gpu(value: Callable[[GpuMetrics], float | None]) -> list[tuple[dict[str, str], float]]:
        readings = ((gpu, value(gpu)) for gpu in gpus)
        return [({"uuid": gpu.uuid}, v) for gpu, v in readings if v is not None]

    info = {"version": metrics.agent_version, "node_id": metrics.node_id}
    return [
        Family("gpu_agent_up", "1 while the agent answers.", "gauge", [({}, 1)]),
        Family("gpu_agent_info", "The agent's version and node id.", "gauge", [(info, 1)]),
        Family(
            "gpu_agent_connected",
            "1 while connected to the coordinator.",
            "gauge",
            [({}, metrics.connected)],
        ),
        Family("gpu_agent_paused", "1 while taking no new jobs.", "gauge", [({}, metrics.paused)]),
        Family(
            "gpu_agent_draining",
            "1 while paused and waiting for running jobs to end.",
            "gauge",
            [({}, metrics.draining)],
        ),
        Family(
            "gpu_agent_outbox_depth",
            "Messages stored for the coordinator and not yet acknowledged.",
            "gauge",
            [({}, metrics.outbox_depth)],
        ),
        Family(
            "gpu_agent_jobs_running", "Jobs running now.", "gauge", [({}, metrics.jobs_running)]
        ),
        Family(
            "gpu_agent_jobs_total",
            "Jobs that ended, by final state.",
            "counter",
            [({"state": state}, n) for state, n in sorted(metrics.jobs_total.items())],
        ),
        Family(
            "gpu_agent_gpu_info",
            "Each GPU's index, name and vendor, by UUID.",
            "gauge",
            [
                ({"uuid": g.uuid, "index": str(g.index), "name": g.name, "vendor": g.vendor}, 1)
                for g in gpus
            ],
        ),
        Family(
            "gpu_agent_gpu_healthy",
            "1 if the GPU takes jobs, 0 if it was marked unhealthy or is initialising.",
            "gauge",
            per_gpu(lambda g: g.healthy),
        ),
        Family(
            "gpu_agent_gpu_assigned",
            "1 while a job holds the GPU.",
            "gauge",
            per_gpu(lambda g: g.assigned),
        ),
        Family(
            "gpu_agent_gpu_temperature_celsius",
            "GPU temperature, where the GPU reports one.",
            "gauge",
            per_gpu(lambda g: g.temperature_c),
        ),
        Family(
            "gpu_agent_gpu_utilization_ratio",
            "GPU utilisation from 0 to 1, where the GPU reports it.",
            "gauge",
            per_gpu(lambda g: g.utilization_ratio),
        ),
    ]


def render(to_render: Iterable[Family]) -> str:
    """Families in the text format 0.0.4; raises ValueError on an invalid name."""
    lines: list[str] = []
    for family in to_render:
        if not _METRIC_NAME.fullmatch(family.name):
            raise ValueError(f"invalid metric name {family.name!r}")
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for labels, value in family.samples:
            lines.append(f"{family.name}{_labels(labels)} {_value(value)}")
    return "\n".join(lines) + "\n"


def exposition(metrics: MetricsInput) -> str:
    """The ``/metrics`` page for one scrape."""
    return render(families(metrics))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    pairs = []
    for name, value in labels.items():
        if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
            raise ValueError(f"invalid label name {name!r}")
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        pairs.append(f'{name}="{escaped}"')
    return "{" + ",".join(pairs) + "}"


def _value(value: float) -> str:
    if isinstance(value, bool | int):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


# ---------------------------------------------------------------------- HTTP


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1 on a loopback address, one response a connection.

    Args:
        source: called once per scrape, in the event loop.
        host: a loopback address (``127.0.0.1``, ``::1`` or ``localhost``); anything else
            is refused with ``ConfigError("bad_config")``: the page names the node and its
            GPUs, and nothing authenticates the scraper.
        port: 0 picks a free one (see ``port`` after ``start``).
    """

    def __init__(
        self, source: Callable[[], MetricsInput], *, host: str = "127.0.0.1", port: int
    ) -> None:
        self.source = source
        self.host = _loopback(host)
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; raises ``ConfigError("bad_config")`` if the port cannot be bound."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=_MAX_REQUEST_HEAD
            )
        except OSError as exc:
            raise ConfigError(
                "bad_config", f"metrics: cannot listen on {self.host} port {self.port}: {exc}"
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                head = b""  # cut short, too long or too slow: a 400
            status, body, extra = self._respond(head)
            kind = CONTENT_TYPE if status.startswith("200") else "text/plain; charset=utf-8"
            response = (
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
            ).encode("ascii")
            writer.write(response if head.startswith(b"HEAD ") else response + body)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        except ConnectionError:
            writer.transport.abort()

    def _respond(self, head: bytes) -> tuple[str, bytes, str]:
        request = head.split(b"\r\n", 1)[0].split(b" ")
        if len(request) != 3 or not request[2].startswith(b"HTTP/1."):
            return "400 Bad Request", b"bad request\n", ""
        method, target = request[0], request[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return "404 Not Found", b"only /metrics is here\n", ""
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"GET or HEAD\n", "Allow: GET, HEAD\r\n"
        try:
            page = exposition(self.source())
        except Exception:
            # A broken reading must cost this scrape, not the daemon.
            _log.exception("metrics: cannot collect")
            return "500 Internal Server Error", b"cannot collect; see the agent's log\n", ""
        return "200 OK", page.encode("utf-8"), ""


def _loopback(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ConfigError(
        "bad_config",
        f"metrics address {host!r} is not a loopback address: use 127.0.0.1 or ::1 "
        "(put a reverse proxy with authentication in front to expose it further)",
    )
