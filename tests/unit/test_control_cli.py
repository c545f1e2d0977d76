"""``gpu-agent status | pause | resume | jobs | logs`` against a real control socket."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from support.control_target import MemoryTarget, job, short_dir, status

from agent.control import client as control_client
from agent.control.cli import add_commands, render_jobs, render_status, run_command
from agent.control.server import ControlServer
from agent.control.wire import JobView, StatusView


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu-agent")
    commands = parser.add_subparsers(dest="command", required=True)
    add_commands(commands, argparse.ArgumentParser)
    commands.add_parser("profile")
    return parser


@pytest.fixture
def target() -> MemoryTarget:
    return MemoryTarget()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


@pytest.fixture
async def server(sock_dir: Path, target: MemoryTarget) -> AsyncIterator[ControlServer]:
    async with ControlServer(target, sock_dir / "agent.sock") as running:
        yield running


async def _gpu_agent(*args: str) -> int | None:
    """The command, run as the CLI runs it: in a thread of its own, with its own loop."""
    return await asyncio.to_thread(run_command, _parser().parse_args(args))


async def test_status_prints_connection_gpus_and_running_jobs(
    server: ControlServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _gpu_agent("status", "--socket", str(server.path)) == 0
    out = capsys.readouterr().out
    assert out == render_status(status()) + "\n"
    lines = out.splitlines()
    assert lines[:5] == [
        "Node         node-7f3a · agent 0.9.0",
        "Coordinator  wss://coordinator.example/agent · connected",
        "State        sharing",
        "Outbox       3 message(s) not yet acknowledged",
        "Today        5 job(s) done",
    ]
    assert lines[6].split() == ["GPU", "NAME", "UUID", "HEALTH", "TEMP", "UTIL", "JOB"]
    assert lines[7].split()[-5:] == ["GPU-aaaa", "healthy", "61°C", "97%", "job-2"]
    assert "unhealthy (xid 79: fallen off the bus)" in lines[8]
    assert lines[8].split()[-3:] == ["-", "-", "-"]
    assert lines[10].split() == ["JOB", "STATE", "GPUS", "SINCE"]
    assert lines[11].split()[:3] == ["job-2", "running", "GPU-aaaa"]


async def test_status_json_is_the_status_view(
    server: ControlServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _gpu_agent("status", "--json", "--socket", str(server.path)) == 0
    assert msgspec.json.decode(capsys.readouterr().out, type=StatusView) == status()


def test_status_text_says_why_it_is_not_sharing() -> None:
    text = render_status(
        status(
            connection="offline",
            connection_error="coordinator key mismatch",
            paused=True,
            pause_reason="owner active",
            draining=True,
            gpus=[],
            jobs=[],
        )
    )
    assert "· offline (coordinator key mismatch)" in text
    assert "State        paused, waiting for 0 running job(s) to end · owner active" in text
    assert "No GPU." in text
    assert "No job running." in text


async def test_pause_and_resume(
    server: ControlServer, target: MemoryTarget, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _gpu_agent("pause", "--socket", str(server.path)) == 0
    assert "State        paused · by the owner" in capsys.readouterr().out
    assert target.state.paused
    assert await _gpu_agent("resume", "--socket", str(server.path)) == 0
    assert "State        sharing" in capsys.readouterr().out
    assert not target.state.paused


async def test_pause_drain_waits_for_the_running_jobs(
    server: ControlServer, target: MemoryTarget, capsys: pytest.CaptureFixture[str]
) -> None:
    pausing = asyncio.create_task(
        _gpu_agent("pause", "--drain", "--json", "--socket", str(server.path))
    )
    await target.drain_started.wait()
    assert not pausing.done()
    target.drained.set()
    assert await pausing == 0
    captured = capsys.readouterr()
    assert "paused; waiting for 1 running job(s) to end" in captured.err
    drained = msgspec.json.decode(captured.out, type=StatusView)
    assert (drained.paused, drained.draining, drained.jobs) == (True, False, [])


async def test_jobs_table_and_json(
    server: ControlServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _gpu_agent("jobs", "--socket", str(server.path)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["JOB", "STATE", "GPUS", "CREATED", "UPDATED", "EXIT", "WHY"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["job-2", "running"],
        ["job-1", "completed"],
    ]
    assert lines[2].split()[-1] == "0"
    assert await _gpu_agent("jobs", "--json", "--limit", "1", "--socket", str(server.path)) == 0
    assert msgspec.json.decode(capsys.readouterr().out, type=list[JobView]) == [
        job("job-2", "running")
    ]


def test_jobs_text_says_why_a_job_failed() -> None:
    text = render_jobs([job("job-9", "failed", exit_code=137, code="oom", detail="over 8 GiB")])
    assert text.splitlines()[1].endswith("137   oom: over 8 GiB")
    assert render_jobs([]) == "No job yet."


@pytest.mark.parametrize("limit", ["0", "1001", "many"])
def test_jobs_limit_out_of_range_is_a_usage_error(
    limit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(["jobs", "--limit", limit])
    assert exited.value.code == 2
    assert limit in capsys.readouterr().err


async def test_logs_go_to_stdout_and_stderr_as_the_job_wrote_them(
    server: ControlServer, target: MemoryTarget, capsys: pytest.CaptureFixture[str]
) -> None:
    target.log("job-1", "stdout", "result: 42\n")
    target.log("job-1", "stderr", "warning: slow\n")
    assert await _gpu_agent("logs", "job-1", "--socket", str(server.path)) == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("result: 42\n", "warning: slow\n")


async def test_logs_follow_prints_until_the_job_ends(
    server: ControlServer, target: MemoryTarget, capsys: pytest.CaptureFixture[str]
) -> None:
    target.log("job-2", "stdout", "step 1\n")
    following = asyncio.create_task(_gpu_agent("logs", "-f", "job-2", "--socket", str(server.path)))
    await target.following.wait()
    target.log("job-2", "stdout", "step 2\n")
    target.end("job-2", exit_code=0)
    assert await following == 0
    assert capsys.readouterr().out == "step 1\nstep 2\n"


async def test_logs_of_an_unknown_job_is_a_coded_error(
    server: ControlServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _gpu_agent("logs", "job-404", "--socket", str(server.path)) == 1
    assert "gpu-agent: error [unknown_job]: no job 'job-404'" in capsys.readouterr().err


async def test_no_daemon_says_how_to_start_it(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _gpu_agent("status", "--socket", str(sock_dir / "agent.sock")) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("gpu-agent: error [daemon_not_running]: nobody answers on ")
    assert err[1] == "gpu-agent: fix: start the service: systemctl start gpu-agent"


async def test_without_socket_option_the_system_socket_is_used_when_it_exists(
    server: ControlServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(control_client, "SYSTEM_SOCKET", server.path)
    assert await _gpu_agent("status", "--json") == 0
    assert msgspec.json.decode(capsys.readouterr().out, type=StatusView).node_id == "node-7f3a"


def test_other_commands_are_not_ours() -> None:
    assert run_command(_parser().parse_args(["profile"])) is None
