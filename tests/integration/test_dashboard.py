"""The dashboard page, rendered by headless Chromium after its JS has run.

A real ``gpu-coordinator serve`` and a real ``gpu-agent run`` on the fake NVML of the
dual RTX A5000 capture (the helpers of test_link.py); once the agent's verified profile and
some telemetry are stored, Chromium loads ``GET /`` and dumps the DOM it built from the read
API, and takes a screenshot of it.

Without Chromium the test skips, or fails under GPU_AGENT_REQUIRE_DOCKER=1 (CI, where
.ci/run installs Debian's ``chromium``).
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from support.dashboard import render
from support.processes import DUAL_A5000, Agent, Coordinator, shutdown, wait_for

# Chromium as root on this closed network: no sandbox, no GPU, nothing phoned home.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def chromium() -> str:
    """Chromium's path; skips, or fails under GPU_AGENT_REQUIRE_DOCKER=1, without one."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = "no chromium on PATH (Debian: apt-get install chromium)"
        if os.environ.get("GPU_AGENT_REQUIRE_DOCKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


class _NodeRows(HTMLParser):
    """The dashboard's ``tr.node`` rows: node id and the text of each classed cell."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[dict[str, Any]] = []
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "tr" and "node" in classes:
            self.rows.append({"data-node-id": attributes.get("data-node-id"), "classes": {}})
        elif tag == "td" and self.rows and classes:
            self._cell = classes[0]
            self.rows[-1]["classes"][self._cell] = classes
            self.rows[-1][self._cell] = ""
        elif tag == "br" and self._cell is not None:
            self.rows[-1][self._cell] += "\n"

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self.rows[-1][self._cell] += data


def _api(coordinator: Coordinator, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{coordinator.port}{path}", timeout=5) as r:
        return json.load(r)


@pytest.fixture
def streaming(
    tmp_path: Path, library_for: Callable[[Path], Path]
) -> Iterator[tuple[Coordinator, str]]:
    """A coordinator with one connected agent whose profile is verified and telemetry stored."""
    coordinator = Coordinator(tmp_path)
    coordinator.start()
    agent = Agent(tmp_path, library_for(DUAL_A5000), coordinator, coordinator.public_key())
    agent.start()
    try:

        def ready() -> bool:
            nodes = _api(coordinator, "/api/nodes")["nodes"]
            return bool(nodes) and all(
                n["connected"] and n["profile_verified"] and n["latest_telemetry"] for n in nodes
            )

        wait_for(ready, "a connected node with a verified profile and telemetry")
        shown = subprocess.run(
            [sys.executable, "-m", "agent.cli", "keys", "show",
             "--state-dir", str(tmp_path / "agent")],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        node_id = next(line.split()[-1] for line in shown.splitlines() if "node id" in line)
        yield coordinator, node_id
        assert agent.stop() == 0
    finally:
        shutdown(coordinator, agent)


def test_dashboard_shows_the_connected_node_its_verified_gpus_and_live_telemetry(
    chromium: str, streaming: tuple[Coordinator, str], tmp_path: Path
) -> None:
    coordinator, node_id = streaming
    url = f"http://127.0.0.1:{coordinator.port}/"

    dom = render(chromium, tmp_path / "chromium-dom", "--dump-dom", url).stdout
    parser = _NodeRows()
    parser.feed(dom)
    assert len(parser.rows) == 1, dom
    row = parser.rows[0]
    assert row["data-node-id"] == node_id
    assert row["node-id"] == node_id
    assert row["state"] == "connected"
    assert "on" in row["classes"]["state"]
    assert row["gpus"].splitlines() == ["NVIDIA RTX A5000", "NVIDIA RTX A5000"]
    assert int(row["seq"]) >= 2  # the profile, then at least one telemetry batch
    # The telemetry cell is the newest sample, as JSON: both GPUs, with the capture's values.
    sample = json.loads(html.unescape(row["telemetry"]))
    assert sample["taken_at"] > 0
    gpus = {gpu["id"]: gpu for gpu in sample["gpus"]}
    assert sorted(gpus) == [
        "GPU-12345678-aaaa-bbbb-cccc-0123456789ab",
        "GPU-12345678-aaaa-bbbb-cccc-0123456789cd",
    ]
    assert gpus["GPU-12345678-aaaa-bbbb-cccc-0123456789ab"]["temperature_c"] == 13
    assert gpus["GPU-12345678-aaaa-bbbb-cccc-0123456789ab"]["fan_pct"] == 30

    screenshot = tmp_path / "dashboard.png"
    render(
        chromium,
        tmp_path / "chromium-shot",
        f"--screenshot={screenshot}",
        "--window-size=1280,800",
        "--hide-scrollbars",
        url,
    )
    png = screenshot.read_bytes()
    assert png.startswith(_PNG_SIGNATURE)
    assert len(png) > 1000
