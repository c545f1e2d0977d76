"""``/metrics``: the text format parsed back line by line, and the loopback HTTP endpoint."""

from __future__ import annotations

import asyncio
import http.client
import math
import re
import urllib.request
from typing import NamedTuple

import pytest
from support.control_target import status

from agent.daemon.metrics import (
    CONTENT_TYPE,
    Family,
    GpuMetrics,
    MetricsInput,
    MetricsServer,
    exposition,
    render,
)
from agent.errors import ConfigError

_SAMPLE = re.compile(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], text)


def parse(text: str) -> tuple[dict[str, tuple[str, str]], list[Sample]]:
    """A strict reader of format 0.0.4: (help, type) by family, and the samples; every
    sample must follow its family's HELP and TYPE."""
    assert text.endswith("\n")
    described: dict[str, tuple[str, str]] = {}
    samples: list[Sample] = []
    help_text: dict[str, str] = {}
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, rest = line[7:].partition(" ")
            assert name not in help_text, f"second HELP for {name}"
            help_text[name] = _unescape(rest)
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert name in help_text
            assert name not in described
            assert kind in ("gauge", "counter")
            described[name] = (help_text[name], kind)
        else:
            match = _SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            labels: dict[str, str] = {}
            raw = match["labels"] or ""
            position = 0
            while position < len(raw):
                label = _LABEL.match(raw, position)
                assert label, f"bad labels in {line!r}"
                labels[label[1]] = _unescape(label[2])
                position = label.end()
            assert match["name"] in described, f"{match['name']} before its TYPE"
            samples.append(Sample(match["name"], labels, float(match["value"])))
    return described, samples


def _metrics(**changes: object) -> MetricsInput:
    base = MetricsInput(
        agent_version="0.9.0",
        node_id="node-7f3a",
        connected=True,
        outbox_depth=3,
        jobs_running=1,
        jobs_total={"completed": 7, "failed": 2},
        gpus=[
            GpuMetrics(
                uuid="GPU-aaaa",
                index=0,
                name="NVIDIA GeForce RTX 4090",
                vendor="nvidia",
                healthy=True,
                assigned=True,
                temperature_c=61.5,
                utilization_ratio=0.97,
            ),
            GpuMetrics(uuid="GPU-bbbb", index=1, name="Arc A770", vendor="intel", healthy=False),
        ],
    )
    return MetricsInput(**{**{f: getattr(base, f) for f in base.__struct_fields__}, **changes})


def _value(samples: list[Sample], name: str, /, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


def test_every_metric_reads_back_with_its_help_type_and_value() -> None:
    described, samples = parse(exposition(_metrics()))
    assert described["gpu_agent_jobs_total"] == ("Jobs that ended, by final state.", "counter")
    assert all(kind == "gauge" for name, (_, kind) in described.items() if name[-6:] != "_total")
    assert _value(samples, "gpu_agent_up") == 1
    assert _value(samples, "gpu_agent_info", version="0.9.0", node_id="node-7f3a") == 1
    assert _value(samples, "gpu_agent_connected") == 1
    assert _value(samples, "gpu_agent_paused") == 0
    assert _value(samples, "gpu_agent_outbox_depth") == 3
    assert _value(samples, "gpu_agent_jobs_running") == 1
    assert _value(samples, "gpu_agent_jobs_total", state="completed") == 7
    assert _value(samples, "gpu_agent_jobs_total", state="failed") == 2
    assert _value(samples, "gpu_agent_gpu_healthy", uuid="GPU-aaaa") == 1
    assert _value(samples, "gpu_agent_gpu_healthy", uuid="GPU-bbbb") == 0
    assert _value(samples, "gpu_agent_gpu_assigned", uuid="GPU-aaaa") == 1
    assert _value(samples, "gpu_agent_gpu_temperature_celsius", uuid="GPU-aaaa") == 61.5
    assert _value(samples, "gpu_agent_gpu_utilization_ratio", uuid="GPU-aaaa") == 0.97
    info = {"uuid": "GPU-bbbb", "index": "1", "name": "Arc A770", "vendor": "intel"}
    assert _value(samples, "gpu_agent_gpu_info", **info) == 1


def test_a_reading_the_gpu_does_not_report_is_left_out_not_zero() -> None:
    _, samples = parse(exposition(_metrics()))
    temperatures = [s.labels["uuid"] for s in samples if s.name.endswith("_temperature_celsius")]
    assert temperatures == ["GPU-aaaa"]


def test_a_node_without_gpus_or_jobs_still_describes_every_family() -> None:
    described, samples = parse(exposition(_metrics(gpus=[], jobs_total={})))
    assert "gpu_agent_gpu_healthy" in described
    assert "gpu_agent_jobs_total" in described
    assert not [s for s in samples if s.name.startswith("gpu_agent_gpu_")]


def test_label_values_and_help_are_escaped() -> None:
    awkward = 'Card "Pro"\\x\nnext'
    gpu = GpuMetrics(uuid="GPU-cccc", index=0, name=awkward, vendor="amd", healthy=True)
    text = exposition(_metrics(gpus=[gpu]))
    assert 'name="Card \\"Pro\\"\\\\x\\nnext"' in text
    _, samples = parse(text)
    assert [s.labels["name"] for s in samples if s.name == "gpu_agent_gpu_info"] == [awkward]
    help_text = render([Family("x", "a \\ b\nc", "gauge", [])])
    assert help_text == "# HELP x a \\\\ b\\nc\n# TYPE x gauge\n"


def test_special_values_are_written_the_prometheus_way() -> None:
    text = render([Family("x", "h", "gauge", [({"k": "inf"}, math.inf), ({"k": "nan"}, math.nan)])])
    assert text.splitlines()[2:] == ['x{k="inf"} +Inf', 'x{k="nan"} NaN']


@pytest.mark.parametrize(
    ("family", "message"),
    [
        (Family("gpu-agent", "h", "gauge", []), "invalid metric name"),
        (Family("x", "h", "gauge", [({"bad-label": "v"}, 1)]), "invalid label name"),
        (Family("x", "h", "gauge", [({"__reserved": "v"}, 1)]), "invalid label name"),
    ],
)
def test_invalid_names_are_refused(family: Family, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render([family])


def test_metrics_from_a_control_status() -> None:
    metrics = MetricsInput.from_status(status(connection="connecting"), {"completed": 5})
    assert (metrics.connected, metrics.jobs_running, metrics.outbox_depth) == (False, 1, 3)
    assert metrics.jobs_total == {"completed": 5}
    busy, broken = metrics.gpus
    assert (busy.healthy, busy.assigned, busy.utilization_ratio) == (True, True, 0.97)
    assert (broken.healthy, broken.assigned, broken.temperature_c) == (False, False, None)


# ---------------------------------------------------------------------- HTTP


def _get(port: int, method: str = "GET", path: str = "/metrics") -> tuple[int, dict[str, str], str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


async def test_get_metrics_serves_the_current_page() -> None:
    current = [_metrics()]
    async with MetricsServer(lambda: current[0], port=0) as server:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with await asyncio.to_thread(urllib.request.urlopen, url, timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == CONTENT_TYPE
            assert response.read().decode() == exposition(current[0])
        current[0] = _metrics(connected=False)
        status_code, _, body = await asyncio.to_thread(_get, server.port)
        assert status_code == 200
        assert _value(parse(body)[1], "gpu_agent_connected") == 0


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/", 404),
        ("GET", "/metrics/x", 404),
        ("POST", "/metrics", 405),
        ("HEAD", "/metrics", 200),
        ("GET", "/metrics?name[]=gpu_agent_up", 200),
    ],
)
async def test_only_get_and_head_of_metrics_are_served(
    method: str, path: str, expected: int
) -> None:
    async with MetricsServer(_metrics, port=0) as server:
        status_code, headers, body = await asyncio.to_thread(_get, server.port, method, path)
    assert status_code == expected
    if method == "HEAD":
        assert body == ""
        assert int(headers["Content-Length"]) == len(exposition(_metrics()).encode())
    if expected == 405:
        assert headers["Allow"] == "GET, HEAD"


async def test_a_request_that_is_not_http_gets_400() -> None:
    async with MetricsServer(_metrics, port=0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"hello there\r\n\r\n")
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def test_a_failing_source_costs_the_scrape_not_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = [True]

    def source() -> MetricsInput:
        if broken[0]:
            raise RuntimeError("sensor gone")
        return _metrics()

    async with MetricsServer(source, port=0) as server:
        assert (await asyncio.to_thread(_get, server.port))[0] == 500
        broken[0] = False
        assert (await asyncio.to_thread(_get, server.port))[0] == 200
    assert "sensor gone" in caplog.text


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com", ""])
def test_a_non_loopback_address_is_refused(host: str) -> None:
    with pytest.raises(ConfigError) as caught:
        MetricsServer(_metrics, host=host, port=0)
    assert caught.value.code == "bad_config"
    assert "not a loopback address" in caught.value.detail


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_addresses_are_accepted(host: str) -> None:
    assert MetricsServer(_metrics, host=host, port=0).host in (host, "127.0.0.1")


async def test_a_port_in_use_is_a_config_error() -> None:
    async with MetricsServer(_metrics, port=0) as first:
        with pytest.raises(ConfigError) as caught:
            await MetricsServer(_metrics, port=first.port).start()
    assert caught.value.code == "bad_config"
    assert str(first.port) in caught.value.detail
