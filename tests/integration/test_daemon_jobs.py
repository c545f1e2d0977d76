"""Jobs end to end: the reference coordinator (in this process, on 127.0.0.1) offers jobs
to ``gpu-agent run`` (a child process on a fake NVML) which runs them on the real Docker
engine. Kill -9 the daemon mid-job, restart the coordinator mid-job: every status, log
chunk and receipt arrives exactly once, and nothing runs twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import msgspec
import pytest
from support.daemon_loop import DUAL_A5000, Loop, job_spec, registered
from support.nvml import write_control
from support.processes import free_port

from agent.control.client import ControlClient
from agent.owner.policy import WEEKDAYS
from coordinator.errors import JobError
from sandbox.docker_api import DockerClient
from sandbox.errors import EngineError


async def test_a_submitted_job_runs_and_its_verified_receipt_reaches_the_coordinator(
    loop: Loop,
) -> None:
    job_id = await loop.c.submit(loop.node_id, job_spec(loop.image, "echo hello; echo oops >&2"))
    await loop.until(lambda: loop.job(job_id).final, "the job to end")
    row = loop.job(job_id)
    assert (row.state, row.code) == ("completed", "")
    assert loop.states(job_id) == ["accepted", "running", "completed"]
    assert row.result is not None
    assert row.result.problems == []
    assert row.result.receipt["exit_code"] == 0
    assert row.result.receipt["offer_sha256"] == row.offer_sha256
    logs = loop.c.store.jobs.logs(job_id)
    assert (logs.stdout, logs.stderr) == ("hello\n", "oops\n")


async def test_cancel_stops_the_container_and_reports_cancelled(loop: Loop) -> None:
    job_id = await loop.c.submit(loop.node_id, job_spec(loop.image, "echo up; sleep 300"))
    await loop.until(lambda: "running" in loop.states(job_id), "the job to run")
    await loop.c.cancel(job_id, "test")
    await loop.until(lambda: loop.job(job_id).final, "the job to stop")
    assert loop.states(job_id) == ["accepted", "running", "cancelled"]
    assert await loop.containers(job_id) == []


async def test_a_daemon_killed_mid_job_reaps_the_orphan_and_reports_interrupted_once(
    loop: Loop,
) -> None:
    job_id = await loop.c.submit(loop.node_id, job_spec(loop.image, "echo up; sleep 300"))
    await loop.until(lambda: "running" in loop.states(job_id), "the job to run")
    assert loop.agent is not None
    loop.agent.kill()
    await loop.exited()
    assert len(await loop.containers(job_id)) == 1  # the orphan, still running
    loop.start_agent()
    await loop.until(lambda: loop.job(job_id).final, "the job to be reported")
    assert await loop.containers(job_id) == []
    assert loop.job(job_id).state == "interrupted"
    # Another restart reports nothing more: exactly once.
    loop.agent.send_signal(signal.SIGTERM)
    assert await loop.exited() == 0
    loop.start_agent()
    await loop.ready()
    await asyncio.sleep(1)
    assert loop.states(job_id) == ["accepted", "running", "interrupted"]
    assert len(loop.bodies("job_result", job_id)) == 1


async def test_a_coordinator_restart_mid_job_loses_and_duplicates_nothing(loop: Loop) -> None:
    script = "for i in $(seq 1 40); do echo line $i; sleep 0.05; done"
    job_id = await loop.c.submit(loop.node_id, job_spec(loop.image, script))
    await loop.until(lambda: "running" in loop.states(job_id), "the job to run")
    await loop.stop_coordinator()
    await asyncio.sleep(1)  # the job goes on; its output waits in the outbox
    await loop.start_coordinator()
    await loop.until(lambda: loop.job(job_id).final, "the job to be reported")
    assert loop.states(job_id) == ["accepted", "running", "completed"]
    assert loop.c.store.jobs.logs(job_id).stdout == "".join(f"line {i}\n" for i in range(1, 41))
    assert len(loop.bodies("job_result", job_id)) == 1
    seqs = loop.c.store.nodes.all_seqs(loop.node_id)
    assert seqs == list(range(1, len(seqs) + 1))


async def test_sigterm_interrupts_the_running_job_and_exits_cleanly(loop: Loop) -> None:
    job_id = await loop.c.submit(loop.node_id, job_spec(loop.image, "sleep 300"))
    await loop.until(lambda: "running" in loop.states(job_id), "the job to run")
    assert loop.agent is not None
    loop.agent.send_signal(signal.SIGTERM)
    assert await loop.exited() == 0
    # The daemon flushed its outbox before it left.
    await loop.until(lambda: loop.job(job_id).final, "the job to be reported")
    assert loop.job(job_id).state == "interrupted"
    assert await loop.containers(job_id) == []
    status = loop.c.store.nodes.latest(loop.node_id, "node_status")
    assert status is not None
    assert status.body["available"] is False
    assert status.body["reason"] == "shutting_down"


async def test_a_critical_xid_marks_the_gpu_unhealthy_and_the_coordinator_is_told(
    loop: Loop,
) -> None:
    def unit_health() -> dict[str, tuple[str, str]]:
        status = loop.c.store.nodes.latest(loop.node_id, "node_status")
        assert status is not None
        return {u["id"]: (u["health"], u.get("reason", "")) for u in status.body["units"]}

    first, second = sorted(unit_health())
    assert set(unit_health().values()) == {("healthy", "")}
    # An application's own fault (Xid 13) leaves the GPU healthy; Xid 79 (fallen off the
    # bus) does not. The fake NVML posts events written to its control file.
    write_control(loop.workdir / "nvml-control", "xid 0 13\nxid 1 79\n")
    await loop.until(lambda: unit_health()[second][0] == "unhealthy", "the GPU marked unhealthy")
    assert unit_health() == {first: ("healthy", ""), second: ("unhealthy", "xid_79")}


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", *argv],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_run_refuses_a_bad_config_naming_the_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[coordinator]\nurl = "wss://c.example/agent"\nkeys = []\n')
    done = _run("--config", str(config))
    assert done.returncode == 2
    assert "error [bad_config]" in done.stderr
    assert str(config) in done.stderr
    assert "coordinator.keys" in done.stderr
    config.write_text("[telemetry]\ninterval_s = -1\n")
    done = _run("--config", str(config), "--coordinator", "ws://127.0.0.1:1/agent")
    assert done.returncode == 2
    assert "telemetry.interval_s" in done.stderr
    done = _run("--config", str(tmp_path / "missing.toml"))
    assert (done.returncode, "missing.toml" in done.stderr) == (2, True)


async def test_run_takes_everything_from_its_config_file(
    tmp_path: Path, library_for: Callable[[Path], Path], test_image_id: str, docker_engine: str
) -> None:
    world = Loop(tmp_path, library_for(DUAL_A5000), test_image_id, DockerClient(docker_engine))
    coordinator = await world.start_coordinator()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[coordinator]\nurl = "ws://127.0.0.1:{world.port}/agent"\n'
        f'keys = ["{coordinator.key.public_key_b64}"]\n'
        f'[paths]\nstate_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n'
        f'[policy]\nallowed_images = ["{test_image_id}"]\n'
    )
    env = {**os.environ, "GPU_AGENT_NVML_LIB": str(world.library)}
    argv = [sys.executable, "-m", "agent.cli", "run", "--config", str(config)]
    with (tmp_path / "agent.log").open("ab") as log:
        world.agent = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
    try:
        node_id = await world.ready()
        job_id = await coordinator.submit(node_id, job_spec(test_image_id, "echo configured"))
        await world.until(lambda: world.job(job_id).final, "the job to end")
        assert world.job(job_id).state == "completed"
        assert (tmp_path / "state" / "outbox.db").exists()
    finally:
        world.agent.send_signal(signal.SIGTERM)
        assert await world.exited() == 0
        await world.stop_coordinator()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return str(answer.read().decode())


def _control(loop: Loop, *argv: str) -> subprocess.CompletedProcess[str]:
    socket_path = loop.workdir / "run" / "agent.sock"
    command = [sys.executable, "-m", "agent.cli", argv[0], "--socket", str(socket_path)]
    return subprocess.run(
        [*command, *argv[1:]], capture_output=True, text=True, check=False, timeout=60
    )


async def test_the_local_control_api_shows_pauses_and_resumes_the_daemon(loop: Loop) -> None:
    job_id = await loop.c.submit(loop.node_id, job_spec(loop.image, "echo from the job"))
    await loop.until(lambda: loop.job(job_id).final, "the job to end")

    done = await asyncio.to_thread(_control, loop, "status", "--json")
    assert done.returncode == 0, done.stderr
    status = msgspec.json.decode(done.stdout)
    assert (status["node_id"], status["connection"]) == (loop.node_id, "connected")
    assert [g["health"] for g in status["gpus"]] == ["healthy", "healthy"]
    assert status["jobs_done_today"] == 1
    jobs = msgspec.json.decode((await asyncio.to_thread(_control, loop, "jobs", "--json")).stdout)
    assert [(j["job_id"], j["state"]) for j in jobs] == [(job_id, "completed")]
    logs = await asyncio.to_thread(_control, loop, "logs", job_id)
    assert logs.stdout == "from the job\n"
    unknown = await asyncio.to_thread(_control, loop, "logs", "job-nope")
    assert (unknown.returncode, "error [unknown_job]" in unknown.stderr) == (1, True)

    # Paused: offers are refused with the reason, and the coordinator is told.
    paused = await asyncio.to_thread(_control, loop, "pause", "--json")
    assert msgspec.json.decode(paused.stdout)["paused"] is True
    refused = await loop.c.submit(loop.node_id, job_spec(loop.image, "true"))
    await loop.until(lambda: loop.job(refused).final, "the refusal")
    assert (loop.job(refused).state, loop.job(refused).code) == ("refused", "paused")
    node = loop.c.store.nodes.latest(loop.node_id, "node_status")
    assert node is not None
    assert (node.body["available"], node.body["reason"]) == (False, "paused")
    await asyncio.to_thread(_control, loop, "resume")
    accepted = await loop.c.submit(loop.node_id, job_spec(loop.image, "true"))
    await loop.until(lambda: loop.job(accepted).final, "the job to end")
    assert loop.job(accepted).state == "completed"


async def test_pause_with_drain_returns_once_running_jobs_have_ended(loop: Loop) -> None:
    job_id = await loop.c.submit(loop.node_id, job_spec(loop.image, "sleep 2; echo done"))
    await loop.until(lambda: "running" in loop.states(job_id), "the job to run")
    drained = await asyncio.to_thread(_control, loop, "pause", "--drain", "--json")
    assert drained.returncode == 0, drained.stderr
    status = msgspec.json.decode(drained.stdout)
    assert (status["paused"], status["draining"], status["jobs"]) == (True, False, [])
    # Drained, not stopped: the job ran to its end.
    await loop.until(lambda: loop.job(job_id).final, "the job's report")
    assert loop.job(job_id).state == "completed"


async def test_metrics_are_served_on_loopback_when_enabled(
    tmp_path: Path, library_for: Callable[[Path], Path], test_image_id: str, docker_engine: str
) -> None:
    world = Loop(tmp_path, library_for(DUAL_A5000), test_image_id, DockerClient(docker_engine))
    await world.start_coordinator()
    port = free_port()
    world.start_agent(
        GPU_AGENT_METRICS_ENABLED="true", GPU_AGENT_METRICS_LISTEN=f"127.0.0.1:{port}"
    )
    try:
        await world.ready()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = (await reader.read()).decode()
        writer.close()
        await writer.wait_closed()
        assert answer.startswith("HTTP/1.1 200")
        lines = answer.splitlines()
        assert "gpu_agent_up 1" in lines
        assert "gpu_agent_connected 1" in lines
        healthy = [line for line in lines if line.startswith("gpu_agent_gpu_healthy{")]
        assert len(healthy) == 2
        assert all(line.endswith(" 1") for line in healthy)
    finally:
        assert world.agent is not None
        world.agent.send_signal(signal.SIGTERM)
        assert await world.exited() == 0
        await world.stop_coordinator()


async def test_an_owner_guard_preempts_the_job_and_the_coordinator_hears_it_once(
    loop: Loop,
) -> None:
    job_id = await loop.c.submit(loop.node_id, job_spec(loop.image, "sleep 300"))
    await loop.until(lambda: "running" in loop.states(job_id), "the job to run")
    # The owner allows sharing only at a time that is not now: the schedule guard trips.
    elsewhere = WEEKDAYS[(datetime.now().weekday() + 2) % 7]
    socket_path = loop.workdir / "run" / "agent.sock"
    async with await ControlClient.connect(socket_path) as client:
        await client.set_settings({"schedule": [{"days": [elsewhere], "end": "00:01"}]})
        await loop.until(lambda: loop.job(job_id).final, "the job to be preempted")
        assert loop.states(job_id) == ["accepted", "running", "preempted"]
        assert len(loop.bodies("job_result", job_id)) == 1
        row = loop.job(job_id)
        assert row.result is not None
        assert (row.result.receipt["state"], row.result.problems) == ("preempted", [])
        assert await loop.containers(job_id) == []
        status = await client.status()
        assert (status.guard, status.paused) == ("outside_schedule", False)
        node = loop.c.store.nodes.latest(loop.node_id, "node_status")
        assert node is not None
        assert (node.body["available"], node.body["reason"]) == (False, "outside_schedule")
        # Cleared: the node takes jobs again, and tells the coordinator.
        await client.set_settings({"schedule": []})
        await loop.until(
            lambda: (
                (latest := loop.c.store.nodes.latest(loop.node_id, "node_status")) is not None
                and latest.body["available"]
            ),
            "the node to be available again",
        )
    assert loop.states(job_id) == ["accepted", "running", "preempted"]


async def test_the_owner_power_limit_holds_while_sharing_and_is_lifted_after(
    loop: Loop,
) -> None:
    socket_path = loop.workdir / "run" / "agent.sock"

    async def limits(client: ControlClient) -> list[str]:
        return [gpu.power_limit for gpu in (await client.status()).gpus]

    async with await ControlClient.connect(socket_path) as client:
        assert await limits(client) == ["", ""]
        await client.set_settings({"power_limit_w": 200})
        await loop.until_async(lambda: limits(client), ["set: 200 W"] * 2, "the limit set")
        # Not sharing (a schedule that excludes now): each GPU gets its own limit back.
        elsewhere = WEEKDAYS[(datetime.now().weekday() + 2) % 7]
        await client.set_settings({"schedule": [{"days": [elsewhere], "end": "00:01"}]})
        await loop.until_async(lambda: limits(client), ["set: 230 W"] * 2, "the limit lifted")
        await client.set_settings({"schedule": [], "power_limit_w": 500})
        await loop.until_async(
            lambda: limits(client),
            ["out_of_range: 500 W is outside this GPU's 100-230 W"] * 2,
            "the refusal",
        )


async def test_pause_for_a_while_from_the_command_line(loop: Loop) -> None:
    paused = await asyncio.to_thread(_control, loop, "pause", "--for", "1h", "--json")
    assert paused.returncode == 0, paused.stderr
    status = msgspec.json.decode(paused.stdout)
    assert status["paused"] is True
    assert 3500 < status["paused_until"] - time.time() <= 3600
    shown = await asyncio.to_thread(_control, loop, "status")
    assert "paused by the owner until" in shown.stdout
    bad = await asyncio.to_thread(_control, loop, "pause", "--for", "soon")
    assert (bad.returncode, "error [bad_argument]" in bad.stderr) == (2, True)


async def test_a_tag_submitted_is_pinned_pulled_with_the_nodes_login_and_run(
    tmp_path: Path, library_for: Callable[[Path], Path], docker_engine: str
) -> None:
    async with registered(tmp_path, library_for) as it:
        loop = it.loop
        node_id = await loop.ready()
        job_id = await loop.c.submit(node_id, job_spec(it.tag, "wc -c < /blob"))
        await loop.until(lambda: loop.job(job_id).final, "the job to end")
        # What the node ran is what was signed: the digest, not the tag.
        assert loop.job(job_id).spec["image"] == it.pinned
        states = loop.states(job_id)
        assert states[:2] == ["accepted", "pulling"]
        assert states[-1] == "completed", loop.bodies("job_status", job_id)
        logs = "".join(b["data"] for b in loop.bodies("job_log", job_id))
        assert logs.strip() == str(1 << 16)
        secret = it.registry.password.encode()
        # Nor in what the control API, the read API or the dashboard show.
        shown = [_control(loop, "status", "--json").stdout, _control(loop, "jobs", "--json").stdout]
        assert job_id in shown[1]
        base = f"http://127.0.0.1:{loop.port}"
        for path in ("/", "/api/jobs", f"/api/jobs/{job_id}", f"/api/nodes/{node_id}"):
            shown.append(await asyncio.to_thread(_get, base + path))
        assert [text[:80] for text in shown if secret.decode() in text] == []
    # The registry's password is nowhere the node or the coordinator keeps or shows.
    kept = [tmp_path / "agent.log", tmp_path / "coordinator.db"]
    kept += [p for p in (tmp_path / "agent").rglob("*") if p.is_file()]
    assert [p for p in kept if secret in p.read_bytes()] == []


async def test_a_short_lived_login_in_the_offer_pulls_where_no_one_has_one_and_shows_nowhere(
    tmp_path: Path,
    library_for: Callable[[Path], Path],
    docker_engine: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with registered(tmp_path, library_for, logins_everywhere=False) as it:
        loop = it.loop
        node_id = await loop.ready()
        # Neither side has a login: the tag cannot be pinned, the digest cannot be pulled.
        with pytest.raises(JobError) as unpinned:
            await loop.c.submit(node_id, job_spec(it.tag, "true"))
        assert unpinned.value.code == "registry_auth_failed"
        refused = await loop.c.submit(node_id, job_spec(it.pinned, "true"))
        await loop.until(lambda: loop.job(refused).final, "the job without a login to end")
        assert (loop.job(refused).state, loop.job(refused).code) == (
            "error",
            "registry_auth_failed",
        )
        # The submitter's login: the coordinator pins the tag with it and signs it into the
        # offer, and the node pulls with it.
        spec_file = tmp_path / "job.json"
        spec_file.write_bytes(msgspec.json.encode(job_spec(it.tag, "wc -c < /blob")))
        argv = [sys.executable, "-m", "coordinator.cli", "submit", str(spec_file)]
        argv += ["--node", node_id, "--wait"]
        argv += ["--registry-logins", str(tmp_path / "registries.toml")]
        argv += ["--state-dir", str(loop.workdir / "coordinator")]
        done = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=180, check=False
        )
        assert done.returncode == 0, done.stderr
        job_id = done.stdout.split()[0]
        assert loop.job(job_id).spec["image"] == it.pinned
        assert loop.states(job_id)[-1] == "completed", loop.bodies("job_status", job_id)
        logs = "".join(b["data"] for b in loop.bodies("job_log", job_id))
        assert logs.strip() == str(1 << 16)
        secret = it.registry.password
        shown = [done.stdout, done.stderr]
        shown += [_control(loop, "status", "--json").stdout]
        shown += [_control(loop, "jobs", "--json").stdout]
        base = f"http://127.0.0.1:{loop.port}"
        for path in ("/", "/api/jobs", f"/api/jobs/{job_id}", f"/api/nodes/{node_id}"):
            shown.append(await asyncio.to_thread(_get, base + path))
        # The read API shows the offer without its payload (base64, which a grep would miss).
        detail = msgspec.json.decode(shown[-2])
        assert detail["offer"]["payload"] is None
        assert detail["offer"]["registry_logins"] == [it.registry.host]
        # Nor in what the node sent: statuses, logs, telemetry, the receipt.
        for kind in ("job_status", "job_log", "job_result", "telemetry", "profile"):
            stored = loop.c.store.nodes.messages(node_id, kind, limit=100_000)
            shown += [msgspec.json.encode(message.body).decode() for message in stored]
        assert [text[:80] for text in shown if secret in text] == []
        # The agent's log and the coordinator's never had it.
        assert secret.encode() not in (tmp_path / "agent.log").read_bytes()
        assert caplog.records
        assert secret not in caplog.text


async def test_an_image_prefetched_is_there_when_its_first_job_comes(
    tmp_path: Path, library_for: Callable[[Path], Path], docker_engine: str
) -> None:
    async with registered(tmp_path, library_for) as it:
        loop = it.loop
        node_id = await loop.ready()
        assert await loop.c.jobs.prefetch(node_id, it.tag) == it.pinned

        async def pulled() -> bool:
            try:
                await loop.docker.request("GET", f"/images/{quote(it.pinned, safe='')}/json")
            except EngineError:
                return False
            return True

        await loop.until_async(pulled, True, "the prefetch to pull the image")
        job_id = await loop.c.submit(node_id, job_spec(it.tag, "true"))
        await loop.until(lambda: loop.job(job_id).final, "the job to end")
        assert loop.states(job_id) == ["accepted", "running", "completed"]  # no pull
        with pytest.raises(JobError) as refused:
            await loop.c.jobs.prefetch(node_id, "sha256:" + "a" * 64)
        assert refused.value.code == "bad_image"
