"""The dashboard's gateway requests, rendered by headless Chromium from the read API."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from support.dashboard import render

from coordinator.gateway.tables import RequestRecord
from coordinator.server import Coordinator


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


def _record(model: str, code: str, tokens: int | None) -> RequestRecord:
    return RequestRecord(
        at=1_700_000_000.0,
        key_id="key-1",
        method="POST",
        path="/v1/chat/completions",
        model=model,
        node_id="node-<b>",
        job_id="svc-1",
        status=200,
        code=code,
        stream=True,
        attempts=1,
        tokens_in=tokens,
        tokens_out=tokens,
        latency_s=0.25,
        ttfb_s=0.01,
        ttft_s=0.0125 if tokens else None,
    )


async def test_the_dashboard_shows_the_newest_gateway_requests(
    chromium: str, tmp_path: Path
) -> None:
    async with Coordinator(db_path=tmp_path / "c.db", state_dir=tmp_path / "s") as server:
        older, newer = _record("tiny", "", 7), _record("<i>x</i>", "upstream_error", None)
        server.store.requests.add([older, newer], keep_rows=100)
        done = await asyncio.to_thread(
            render, chromium, tmp_path / "profile", "--dump-dom", server.dashboard_url
        )
    page = done.stdout.split("<script>", 1)[0]  # the page as built, not its script
    rows = page.split('<tr class="request">')[1:]
    assert len(rows) == 2
    first, second = rows
    assert '<td class="model">&lt;i&gt;x&lt;/i&gt;</td>' in first  # escaped, newest first
    assert '<td class="status">200 upstream_error</td>' in first
    assert '<td class="tokens">-/-</td>' in first
    assert '<td class="node">node-&lt;b&gt;</td>' in second
    assert '<td class="tokens">7/7</td>' in second
    assert '<td class="latency">250</td>' in second
    assert '<td class="ttft">13</td>' in second
