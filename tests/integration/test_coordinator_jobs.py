"""Jobs through the reference coordinator: signed offers out, states, logs, receipts in.

A real Coordinator on 127.0.0.1:0 with a real SQLite file; the agent side is the
protocol-speaking test peer of coordinator_peer.py. The CLI runs against a real
``gpu-coordinator serve`` subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.admission import acks_stored
from support.coordinator_peer import Peer, connected, signed_receipt
from support.dashboard import render

from agent.protocol.bodies import InputProgress, JobStatusBody, LayerProgress
from agent.protocol.jobs import receipt_digest
from agent.protocol.messages import AttestRequest, JobCancel, JobOffer
from coordinator import jobs_api, keys
from coordinator.errors import JobError
from coordinator.jobs_store import MAX_LOG_BYTES
from coordinator.server import Coordinator, Settings

PINNED = "busybox@sha256:" + "a" * 64
SPEC: dict[str, Any] = {"image": PINNED, "command": ["echo", "hi"]}


def _coordinator(tmp_path: Path) -> Coordinator:
    return Coordinator(
        db_path=tmp_path / "coordinator.db",
        state_dir=tmp_path / "state",
        settings=Settings(handshake_timeout_s=5.0),
    )


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    async with _coordinator(tmp_path) as server:
        yield server


def _pinned(coordinator: Coordinator) -> dict[str, bytes]:
    return {coordinator.key.key_id: coordinator.key.public_key}


def _link(coordinator: Coordinator, peer: Peer) -> Any:
    return connected(coordinator.url, _pinned(coordinator), peer)


async def _known(coordinator: Coordinator, peer: Peer) -> None:
    """Connect once, so that the coordinator knows the node, and leave."""
    async with _link(coordinator, peer) as link:
        await link.take(AttestRequest)
    await acks_stored(coordinator, peer.node_id)


def _http(method: str, url: str, body: object = None, token: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


async def _get(url: str) -> Any:
    status, body = await asyncio.to_thread(_http, "GET", url)
    assert status == 200, body
    return body


# ------------------------------------------------------------------ offers out


async def test_offer_to_a_connected_node_is_signed_for_it_and_verifies(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    async with _link(coordinator, peer) as link:
        # The session's attest_request is stored through the writer: here before the offer.
        await link.take(AttestRequest)
        job_id = await coordinator.submit(peer.node_id, SPEC)
        offer = await link.take(JobOffer)
        assert offer.body.job_id == job_id
        verified = link.verify(offer, _pinned(coordinator))
        assert (verified.job_id, verified.node_id, verified.spec) == (job_id, peer.node_id, SPEC)
        assert 3599 < verified.expires_at - verified.issued_at <= 3600
    job = coordinator.store.jobs.get(job_id)
    assert job is not None
    assert (job.state, job.node_id, job.spec, job.offer_seq) == ("offered", peer.node_id, SPEC, 2)
    assert job_id.startswith("job-")
    await acks_stored(coordinator, peer.node_id)  # acknowledged


async def test_offer_to_an_offline_node_goes_out_once_after_its_next_handshake(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    await _known(coordinator, peer)
    job_id = await coordinator.submit(peer.node_id, SPEC, job_id="job-offline")
    assert job_id == "job-offline"
    assert [kind for _, kind, _ in coordinator.store.streams.outbound(peer.node_id).pending] == [
        "job_offer"
    ]
    async with _link(coordinator, peer) as link:
        offer = await link.take(JobOffer)
        assert link.verify(offer, _pinned(coordinator)).job_id == job_id
        # A pending offer does not hold back the session's attestation request.
        await link.take(AttestRequest)
    async with _link(coordinator, peer) as link:
        await link.take(AttestRequest)
    kinds = [type(m).__name__ for m in peer.stored]
    assert kinds == ["AttestRequest", "JobOffer", "AttestRequest", "AttestRequest"]


async def test_offer_and_cancel_survive_a_coordinator_restart_and_arrive_once(
    tmp_path: Path,
) -> None:
    peer = Peer()
    async with _coordinator(tmp_path) as first:
        await _known(first, peer)
        job_id = await first.submit(peer.node_id, SPEC)
        await first.cancel(job_id, "changed my mind")
    async with _coordinator(tmp_path) as second:
        async with _link(second, peer) as link:
            offer = await link.take(JobOffer)
            cancel = await link.take(JobCancel)
            assert link.verify(offer, _pinned(second)).job_id == job_id
            assert (cancel.body.job_id, cancel.body.reason) == (job_id, "changed my mind")
            assert cancel.seq == offer.seq + 1
        async with _link(second, peer) as link:
            await link.take(AttestRequest)
    assert len(peer.of_type(JobOffer)) == len(peer.of_type(JobCancel)) == 1


async def test_cancel_sends_job_cancel_once_and_refuses_unknown_or_final_jobs(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    async with _link(coordinator, peer) as link:
        # The session's attest_request is stored through the writer: here before the offer.
        await link.take(AttestRequest)
        job_id = await coordinator.submit(peer.node_id, SPEC)
        await link.take(JobOffer)
        await link.status(job_id, "accepted")
        await coordinator.cancel(job_id, "operator")
        cancel = await link.take(JobCancel)
        assert (cancel.body.job_id, cancel.body.reason) == (job_id, "operator")
        await coordinator.cancel(job_id)  # under way already: nothing more is sent
        other = await coordinator.submit(peer.node_id, SPEC)
        assert (await link.take(JobOffer)).body.job_id == other
        kinds = [type(m) for m in peer.stored]
        assert kinds == [AttestRequest, JobOffer, JobCancel, JobOffer]
        await link.status(job_id, "cancelled")
    job = coordinator.store.jobs.get(job_id)
    assert job is not None
    assert job.state == "cancelled"
    assert job.cancel_requested is not None
    with pytest.raises(JobError) as final:
        await coordinator.cancel(job_id)
    assert final.value.code == "job_final"
    with pytest.raises(JobError) as unknown:
        await coordinator.cancel("job-nope")
    assert unknown.value.code == "unknown_job"


@pytest.mark.parametrize(
    ("node", "spec", "options", "code"),
    [
        ("stranger", SPEC, {}, "unknown_node"),
        ("peer", ["not", "an", "object"], {}, "bad_spec"),
        ("peer", {"env": {"X": object()}}, {}, "bad_spec"),
        ("peer", SPEC, {"job_id": "-bad id"}, "bad_job_id"),
        ("peer", SPEC, {"job_id": "j" * 65}, "bad_job_id"),
        ("peer", SPEC, {"ttl_s": 0}, "bad_ttl"),
        ("peer", SPEC, {"ttl_s": float("inf")}, "bad_ttl"),
        ("peer", {**SPEC, "env": {"BLOB": "x" * 800_000}}, {}, "spec_too_large"),
        ("peer", SPEC, {"job_id": "job-taken"}, "job_exists"),
    ],
)
async def test_bad_submission_is_refused_with_its_code_and_changes_nothing(
    coordinator: Coordinator, node: str, spec: Any, options: dict[str, Any], code: str
) -> None:
    peer = Peer()
    await _known(coordinator, peer)
    await coordinator.submit(peer.node_id, SPEC, job_id="job-taken")
    before = coordinator.store.streams.outbound(peer.node_id)
    with pytest.raises(JobError) as refused:
        await coordinator.submit(peer.node_id if node == "peer" else node, spec, **options)
    assert refused.value.code == code
    assert coordinator.store.streams.outbound(peer.node_id) == before
    assert [j.job_id for j in coordinator.store.jobs.recent()] == ["job-taken"]


# ------------------------------------------------------------------ what the agent reports


async def test_states_logs_and_the_receipt_show_in_the_api(coordinator: Coordinator) -> None:
    peer = Peer()
    base = f"http://127.0.0.1:{coordinator.port}"
    async with _link(coordinator, peer) as link:
        job_id = await coordinator.submit(peer.node_id, SPEC)
        offer = link.verify(await link.take(JobOffer), _pinned(coordinator))
        await link.status(job_id, "accepted")
        await link.status(job_id, "running")
        detail = await _get(f"{base}/api/jobs/{job_id}")
        assert (detail["state"], detail["final"], detail["result"]) == ("running", False, None)
        await link.log(job_id, "line 1\n")
        await link.log(job_id, "oops\n", "stderr")
        await link.log(job_id, "line 2\n")
        result = signed_receipt(peer, offer)
        await link.send(result)
        await link.status(job_id, "completed")
        assert coordinator.connected() == {peer.node_id}
        detail = await _get(f"{base}/api/jobs/{job_id}")
        listed = await _get(f"{base}/api/jobs")
    assert (detail["state"], detail["final"], detail["node_id"]) == (
        "completed",
        True,
        peer.node_id,
    )
    assert detail["node_connected"] is True
    assert detail["spec"] == SPEC
    assert detail["logs"] == {
        "stdout": "line 1\nline 2\n",
        "stderr": "oops\n",
        "truncated": False,
        "kept_bytes": 19,
        "dropped_bytes": 0,
    }
    outcome = detail["result"]
    assert outcome["receipt"]["job_id"] == job_id
    assert outcome["receipt_sha256"] == receipt_digest(outcome["receipt"]) == peer.last_receipt
    assert outcome["envelope"] == msgspec.to_builtins(result.receipt)
    assert (outcome["verified"], outcome["chain_ok"], outcome["problems"]) == (True, True, [])
    [summary] = listed["jobs"]
    assert (summary["job_id"], summary["node_id"], summary["state"]) == (
        job_id,
        peer.node_id,
        "completed",
    )
    assert summary["url"] == f"/api/jobs/{job_id}"


async def test_receipt_chain_holds_across_jobs_and_a_break_is_flagged_not_closed(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    async with _link(coordinator, peer) as link:
        offers = []
        for _ in range(3):
            await coordinator.submit(peer.node_id, SPEC)
            offers.append(link.verify(await link.take(JobOffer), _pinned(coordinator)))
        await link.send(signed_receipt(peer, offers[0]))
        await link.send(signed_receipt(peer, offers[1]))
        # The third names a receipt the coordinator never saw: a dropped or rewritten one.
        await link.send(signed_receipt(peer, offers[2], prev="f" * 64))
        # The chain goes on from the broken receipt; the connection was never closed.
        fourth = await coordinator.submit(peer.node_id, SPEC)
        await link.send(
            signed_receipt(peer, link.verify(await link.take(JobOffer), _pinned(coordinator)))
        )
    store = coordinator.store
    chain_ok = []
    for offer in offers:
        job = store.jobs.get(offer.job_id)
        assert job is not None
        assert job.result is not None
        chain_ok.append(job.result.chain_ok)
    assert chain_ok == [True, True, False]
    broken = store.jobs.get(offers[2].job_id)
    assert broken is not None
    assert broken.result is not None
    assert broken.result.problems == ["chain_broken"]
    last = store.jobs.get(fourth)
    assert last is not None
    assert last.result is not None
    assert last.result.problems == []
    chain = store.jobs.receipt_chain(peer.node_id)
    assert (chain.last_receipt, chain.receipts, chain.breaks) == (peer.last_receipt, 4, 1)


@pytest.mark.parametrize(
    ("fields", "problems"),
    [
        ({"job_id": "job-other"}, ["job_mismatch"]),
        ({"node_id": "node-someone-else"}, ["node_mismatch"]),
        ({"offer_sha256": "0" * 64}, ["offer_mismatch"]),
        ({"state": "running"}, ["not_final"]),
    ],
)
async def test_receipt_that_does_not_match_its_job_is_stored_with_its_problems(
    coordinator: Coordinator, fields: dict[str, Any], problems: list[str]
) -> None:
    peer = Peer()
    async with _link(coordinator, peer) as link:
        # The session's attest_request is stored through the writer: here before the offer.
        await link.take(AttestRequest)
        job_id = await coordinator.submit(peer.node_id, SPEC)
        offer = link.verify(await link.take(JobOffer), _pinned(coordinator))
        result = signed_receipt(peer, offer, **fields)
        # The job_result names the job; the receipt inside says something else.
        await link.send(type(result)(job_id=job_id, receipt=result.receipt))
        await link.status(job_id, "completed")
    job = coordinator.store.jobs.get(job_id)
    assert job is not None
    assert job.result is not None
    assert job.result.problems == problems
    assert job.result.chain_ok


async def test_reports_about_unknown_or_foreign_jobs_are_kept_and_change_no_job(
    coordinator: Coordinator,
) -> None:
    owner, other = Peer(), Peer()
    await _known(coordinator, owner)
    job_id = await coordinator.submit(owner.node_id, SPEC)
    async with _link(coordinator, other) as link:
        # A refusal of an offer the coordinator never made (a forged one), and reports on
        # a job offered to another node: stored as messages, acknowledged, applied to nothing.
        await link.status("job-forged", "refused", "bad_signature", "no trusted signature")
        await link.status(job_id, "completed")
        await link.log(job_id, "not yours\n")
    job = coordinator.store.jobs.get(job_id)
    assert job is not None
    assert (job.state, job.log_bytes) == ("offered", 0)
    assert coordinator.store.jobs.get("job-forged") is None
    kinds = [m.type for m in coordinator.store.nodes.messages(other.node_id, "job_status")]
    assert kinds == ["job_status", "job_status"]


async def test_a_final_state_is_never_left(coordinator: Coordinator) -> None:
    peer = Peer()
    async with _link(coordinator, peer) as link:
        # The session's attest_request is stored through the writer: here before the offer.
        await link.take(AttestRequest)
        job_id = await coordinator.submit(peer.node_id, SPEC)
        await link.take(JobOffer)
        await link.status(job_id, "refused", "over_capacity", "no free GPU")
        await link.status(job_id, "running")
        await link.status(job_id, "no_such_state")
    job = coordinator.store.jobs.get(job_id)
    assert job is not None
    assert (job.state, job.code, job.detail) == ("refused", "over_capacity", "no free GPU")


async def test_logs_past_the_cap_are_counted_not_kept(coordinator: Coordinator) -> None:
    peer = Peer()
    chunk = "é" * 32 * 1024  # 64 KiB of UTF-8, two bytes a character
    chunks = MAX_LOG_BYTES // len(chunk.encode()) + 2
    async with _link(coordinator, peer) as link:
        job_id = await coordinator.submit(peer.node_id, SPEC)
        await link.take(JobOffer)
        await link.log(job_id, "x")  # one byte: the cap then falls mid-character
        for _ in range(chunks):
            await link.log(job_id, chunk)
    logs = coordinator.store.jobs.logs(job_id)
    sent = 1 + chunks * len(chunk.encode())
    assert logs.kept_bytes == MAX_LOG_BYTES - 1  # whole characters only
    assert logs.dropped_bytes == sent - logs.kept_bytes
    assert logs.truncated
    assert len(logs.stdout.encode()) == logs.kept_bytes
    assert logs.stdout.startswith("xé")


# ------------------------------------------------------------------ the admin API


async def test_admin_api_submits_and_cancels_with_the_token_only(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    admin, token = coordinator.admin_url, coordinator.admin_token
    assert coordinator.admin_file is not None
    assert os.stat(coordinator.admin_file).st_mode & 0o777 == 0o600
    written = json.loads(coordinator.admin_file.read_text())
    assert written == {"url": admin, "token": token}

    def post(path: str, body: object, token: str | None = token) -> tuple[int, Any]:
        return _http("POST", admin + path, body, token)

    async with _link(coordinator, peer) as link:
        request = {"node_id": peer.node_id, "spec": SPEC, "job_id": "job-http"}
        for refused_token in (None, "wrong", token + "x"):
            status, answer = await asyncio.to_thread(post, "/api/jobs", request, refused_token)
            assert (status, answer["error"]["code"]) == (401, "unauthorized")
        status, answer = await asyncio.to_thread(post, "/api/jobs", request)
        assert (status, answer) == (201, {"job_id": "job-http", "url": "/api/jobs/job-http"})
        assert (await link.take(JobOffer)).body.job_id == "job-http"
        status, answer = await asyncio.to_thread(post, "/api/jobs/job-http/cancel", {})
        assert (status, answer) == (202, {"job_id": "job-http"})
        assert (await link.take(JobCancel)).body.job_id == "job-http"
        await link.status("job-http", "cancelled")
    # Reads need no token, on the admin listener as on the public port.
    status, listed = await asyncio.to_thread(_http, "GET", admin + "/api/jobs")
    assert (status, listed["jobs"][0]["state"]) == (200, "cancelled")


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/api/jobs", "not json", 400, "bad_request"),
        ("/api/jobs", {"spec": SPEC}, 400, "bad_request"),
        ("/api/jobs", {"node_id": "NODE", "spec": SPEC, "extra": 1}, 400, "bad_request"),
        ("/api/jobs", {"node_id": "NODE", "spec": "image=x"}, 400, "bad_spec"),
        ("/api/jobs", {"node_id": "NODE", "spec": SPEC, "job_id": "a b"}, 400, "bad_job_id"),
        ("/api/jobs", {"node_id": "NODE", "spec": SPEC, "ttl_s": -1}, 400, "bad_ttl"),
        ("/api/jobs", {"node_id": "node-nope", "spec": SPEC}, 404, "unknown_node"),
        ("/api/jobs", {"node_id": "NODE", "spec": SPEC, "job_id": "job-1"}, 409, "job_exists"),
        ("/api/jobs/job-nope/cancel", {}, 404, "unknown_job"),
        ("/api/jobs/job-done/cancel", {}, 409, "job_final"),
        ("/api/jobs/job-1/cancel", {"reason": "x" * 1025}, 400, "bad_reason"),
        ("/api/nodes", {}, 404, "not_found"),
    ],
)
async def test_admin_api_refuses_bad_requests_with_their_codes(
    coordinator: Coordinator, path: str, body: Any, status: int, code: str
) -> None:
    peer = Peer()
    async with _link(coordinator, peer) as link:
        await coordinator.submit(peer.node_id, SPEC, job_id="job-1")
        await coordinator.submit(peer.node_id, SPEC, job_id="job-done")
        await link.status("job-done", "completed")
    if isinstance(body, dict) and body.get("node_id") == "NODE":
        body = body | {"node_id": peer.node_id}
    raw = body if isinstance(body, str) else json.dumps(body)
    request = urllib.request.Request(coordinator.admin_url + path, data=raw.encode(), method="POST")
    request.add_header("Authorization", f"Bearer {coordinator.admin_token}")

    def send() -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    answer_status, answer = await asyncio.to_thread(send)
    assert (answer_status, answer["error"]["code"]) == (status, code)
    assert [j.job_id for j in coordinator.store.jobs.recent()] == ["job-done", "job-1"]


async def test_public_port_serves_jobs_read_only(coordinator: Coordinator) -> None:
    base = f"http://127.0.0.1:{coordinator.port}"
    status, answer = await asyncio.to_thread(_http, "GET", base + "/api/jobs/job-nope")
    assert (status, answer["error"]["code"]) == (404, "unknown_job")
    status, answer = await asyncio.to_thread(_http, "POST", base + "/api/jobs")
    assert (status, answer["error"]["code"]) == (405, "method_not_allowed")
    status, answer = await asyncio.to_thread(_http, "GET", base + "/api/jobs?limit=0")
    assert (status, answer["error"]["code"]) == (400, "bad_request")


class _JobRows(HTMLParser):
    """The dashboard's ``tr.job`` rows: the text of each classed cell, and the link."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[dict[str, str]] = []
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "tr" and "job" in classes:
            self.rows.append({"data-job-id": attributes.get("data-job-id") or ""})
        elif tag == "td" and self.rows and classes:
            self._cell = classes[0]
            self.rows[-1][self._cell] = ""
        elif tag == "a" and self._cell is not None:
            self.rows[-1]["href"] = attributes.get("href") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self.rows[-1][self._cell] += data


@pytest.fixture
def chromium() -> str:
    """Chromium's path; skips, or fails under GPU_AGENT_REQUIRE_DOCKER=1, without one."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = "no chromium on PATH (Debian: apt-get install chromium)"
        if os.environ.get("GPU_AGENT_REQUIRE_DOCKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


async def test_dashboard_lists_jobs_newest_first_with_links(
    coordinator: Coordinator, chromium: str, tmp_path: Path
) -> None:
    peer = Peer()
    async with _link(coordinator, peer) as link:
        await coordinator.submit(peer.node_id, SPEC, job_id="job-old")
        await coordinator.submit(peer.node_id, SPEC, job_id="job-new")
        await link.status("job-old", "refused", "over_capacity")
    url = f"http://127.0.0.1:{coordinator.port}/"
    rendered = await asyncio.to_thread(render, chromium, tmp_path / "chromium", "--dump-dom", url)
    parser = _JobRows()
    parser.feed(rendered.stdout)
    assert [(r["data-job-id"], r["job-id"], r["href"]) for r in parser.rows] == [
        ("job-new", "job-new", "/api/jobs/job-new"),
        ("job-old", "job-old", "/api/jobs/job-old"),
    ]
    assert [(r["node"], r["state"]) for r in parser.rows] == [
        (peer.node_id, "offered"),
        (peer.node_id, "refused (over_capacity)"),
    ]
    assert all(r["updated"].endswith("Z") for r in parser.rows)


async def test_dashboard_shows_how_far_a_pull_and_a_fetch_are(
    coordinator: Coordinator, chromium: str, tmp_path: Path
) -> None:
    peer = Peer()
    async with _link(coordinator, peer) as link:
        await coordinator.submit(peer.node_id, SPEC, job_id="job-pull")
        await coordinator.submit(peer.node_id, SPEC, job_id="job-fetch")
        await link.take(JobOffer)
        await link.take(JobOffer)
        for job_id in ("job-pull", "job-fetch"):
            await link.status(job_id, "accepted")
        layers = [LayerProgress(layer="a", done=30, total=100)]
        await link.send(JobStatusBody(job_id="job-pull", state="pulling", progress=layers))
        inputs = [InputProgress(path="m.bin", done=60, total=100)]
        await link.send(JobStatusBody(job_id="job-fetch", state="fetching", inputs=inputs))
    url = f"http://127.0.0.1:{coordinator.port}/"
    rendered = await asyncio.to_thread(render, chromium, tmp_path / "chromium", "--dump-dom", url)
    parser = _JobRows()
    parser.feed(rendered.stdout)
    assert {r["data-job-id"]: r["state"] for r in parser.rows} == {
        "job-pull": "pulling 30%",
        "job-fetch": "fetching 60%",
    }


# ------------------------------------------------------------------ the CLI


class _Serve:
    """``gpu-coordinator serve`` as a child process."""

    def __init__(self, workdir: Path) -> None:
        self.state = workdir / "state"
        command = [sys.executable, "-m", "coordinator.cli", "serve", "--port", "0"]
        command += ["--db", str(workdir / "c.db"), "--state-dir", str(self.state)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        lines = [self.process.stdout.readline() for _ in range(4)]
        self.url = lines[0].split()[-1]
        assert lines[3].startswith("admin API at http://127.0.0.1:")
        assert lines[3].rstrip().endswith(f"(token in {self.state / 'admin.json'})")
        key = keys.load_or_create(self.state)
        self.pinned = {key.key_id: key.public_key}

    def stop(self) -> None:
        self.process.terminate()
        assert self.process.wait(timeout=10) == 0
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[_Serve]:
    server = _Serve(tmp_path)
    yield server
    server.stop()


async def _cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_submits_waits_cancels_and_lists_jobs(serve: _Serve, tmp_path: Path) -> None:
    spec_file = tmp_path / "job.toml"
    spec_file.write_text(
        f'image = "{PINNED}"\ncommand = ["true"]\n[resources]\nmemory_bytes = "1GiB"\n'
    )
    state = ["--state-dir", str(serve.state)]
    peer = Peer()
    async with connected(serve.url, serve.pinned, peer) as link:
        code, out, err = await _cli("submit", str(spec_file), "--node", peer.node_id, *state)
        assert (code, err) == (0, "")
        job_id = out.strip()
        offer = link.verify(await link.take(JobOffer), serve.pinned)
        assert offer.spec == {
            "image": PINNED,
            "command": ["true"],
            "resources": {"memory_bytes": "1GiB"},
        }
        assert (await _cli("cancel", job_id, "--reason", "test", *state))[0] == 0
        assert (await link.take(JobCancel)).body.reason == "test"
        await link.status(job_id, "cancelled")

        waiting = asyncio.create_task(
            _cli("submit", str(spec_file), "--node", peer.node_id, "--job-id", "job-w", "--wait",
                 *state)
        )  # fmt: skip
        offer = link.verify(await link.take(JobOffer), serve.pinned)
        await link.status("job-w", "running")
        await link.send(signed_receipt(peer, offer))
        await link.status("job-w", "completed")
        code, out, err = await waiting
        assert (code, err) == (0, "")
        assert out.splitlines() == ["job-w", f"completed receipt={peer.last_receipt} chain=ok"]

        failing = asyncio.create_task(
            _cli("submit", str(spec_file), "--node", peer.node_id, "--wait", *state)
        )
        offer = link.verify(await link.take(JobOffer), serve.pinned)
        await link.send(signed_receipt(peer, offer, state="failed", code="exit_nonzero"))
        await link.status(offer.job_id, "failed", "exit_nonzero")
        code, out, _ = await failing
        assert code == 1
        assert out.splitlines()[1].startswith("failed code=exit_nonzero receipt=")

    code, out, _ = await _cli("jobs", *state)
    assert code == 0
    rows = [line.split()[:3] for line in out.splitlines()[1:]]
    assert [r[1:] for r in rows] == [
        [peer.node_id, s] for s in ("failed", "completed", "cancelled")
    ]
    code, out, _ = await _cli("jobs", "--json", *state)
    assert [j["job_id"] for j in json.loads(out)["jobs"]][1:] == ["job-w", job_id]


async def test_cli_errors_are_coded(serve: _Serve, tmp_path: Path) -> None:
    state = ["--state-dir", str(serve.state)]
    good = tmp_path / "job.json"
    good.write_text(json.dumps(SPEC))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.toml").write_text("image = ")
    cases = [
        ("bad_spec", 2, ["submit", str(tmp_path / "job.yaml"), "--node", "n", *state]),
        ("bad_spec", 2, ["submit", str(tmp_path / "list.json"), "--node", "n", *state]),
        ("bad_spec", 2, ["submit", str(tmp_path / "broken.toml"), "--node", "n", *state]),
        ("bad_argument", 2, ["submit", str(good), *state]),
        ("bad_argument", 2, ["submit", str(good), "--node", "n", "--ttl", "-1", *state]),
        ("unknown_node", 1, ["submit", str(good), "--node", "node-nope", *state]),
        ("unknown_job", 1, ["cancel", "job-nope", *state]),
        ("admin_file_missing", 1, ["jobs", "--state-dir", str(tmp_path / "elsewhere")]),
        ("admin_unreachable", 1, ["jobs", *state, "--url", "http://127.0.0.1:1"]),
    ]
    for code, status, argv in cases:
        returned, _, err = await _cli(*argv)
        assert (returned, f"error [{code}]" in err) == (status, True), (argv, err)


def test_serve_writes_a_fresh_admin_token_each_start(tmp_path: Path) -> None:
    tokens = []
    for _ in range(2):
        server = _Serve(tmp_path)
        tokens.append(json.loads((server.state / "admin.json").read_text())["token"])
        server.stop()
    assert tokens[0] != tokens[1]


@pytest.mark.parametrize("state", ["pulling", "fetching"])
async def test_the_job_list_shows_how_far_a_pull_or_a_fetch_is(
    coordinator: Coordinator, state: str
) -> None:
    peer = Peer()
    async with _link(coordinator, peer) as link:
        # The session's attest_request is stored through the writer: here before the offer.
        await link.take(AttestRequest)
        job_id = await coordinator.submit(peer.node_id, SPEC)
        await link.take(JobOffer)
        await link.status(job_id, "accepted")
        if state == "pulling":
            layers = [
                LayerProgress(layer="a", done=30, total=50),
                LayerProgress(layer="b", done=0, total=50),
            ]
            body = JobStatusBody(job_id=job_id, state=state, progress=layers)
            done, total = "pulled_bytes", "pull_bytes"
        else:
            inputs = [
                InputProgress(path="w/a.bin", done=30, total=50),
                InputProgress(path="b.bin", done=0, total=50),
            ]
            body = JobStatusBody(job_id=job_id, state=state, inputs=inputs)
            done, total = "fetched_bytes", "fetch_bytes"
        await link.send(body)
        [summary] = [j for j in _list(coordinator) if j["job_id"] == job_id]
        assert (summary["state"], summary[done], summary[total]) == (state, 30, 100)
        await link.status(job_id, "running")
        [summary] = [j for j in _list(coordinator) if j["job_id"] == job_id]
        assert total not in summary


def _list(coordinator: Coordinator) -> list[dict[str, Any]]:
    answer = jobs_api.job_list(coordinator.jobs, {})
    return list(msgspec.json.decode(answer.body)["jobs"])
