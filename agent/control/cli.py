"""``gpu-agent status | pause | resume | jobs | logs``: the daemon's control API from a shell.

``agent.cli`` adds these with ``add_commands`` and runs them with ``run_command``. They
import nothing from ``hal`` or ``sandbox``, so they start fast.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import msgspec

from agent.control.args import COMMANDS, add_commands
from agent.control.client import ControlClient, default_socket_path
from agent.control.wire import GpuView, JobView, StatusView
from agent.errors import ControlError

__all__ = ["COMMANDS", "add_commands", "render_jobs", "render_status", "run_command"]

EXIT_INTERRUPTED: Final = 130


def run_command(args: argparse.Namespace) -> int | None:
    """Run a control command; return its exit status, or None if it is not one of them."""
    if getattr(args, "command", None) not in COMMANDS:
        return None
    path: Path = args.socket or default_socket_path()
    try:
        return asyncio.run(_run(path, args))
    except ControlError as exc:
        print(f"gpu-agent: error [{exc.code}]: {exc.detail}", file=sys.stderr)
        if exc.fix:
            print(f"gpu-agent: fix: {exc.fix}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def _run(path: Path, args: argparse.Namespace) -> int:
    timeout: float = args.timeout
    async with await ControlClient.connect(path, timeout=timeout) as client:
        if args.command == "logs":
            async for item in client.logs(args.job_id, follow=args.follow, timeout=timeout):
                if isinstance(item, JobView):
                    break
                out = sys.stdout if item.stream == "stdout" else sys.stderr
                out.write(item.data)
                out.flush()
            return 0
        if args.command == "jobs":
            jobs = await client.jobs(args.limit, timeout=timeout)
            _print(jobs if args.json else render_jobs(jobs))
            return 0
        if args.command == "pause" and args.drain:
            running = len((await client.status(timeout=timeout)).jobs)
            if running:
                print(
                    f"paused; waiting for {running} running job(s) to end "
                    "(Ctrl-C stops waiting, the agent stays paused)",
                    file=sys.stderr,
                )
        if args.command == "pause":
            until = time.time() + args.duration if args.duration else None
            status = await client.pause(drain=args.drain, until=until, timeout=timeout)
        elif args.command == "resume":
            status = await client.resume(timeout=timeout)
        else:
            status = await client.status(timeout=timeout)
        _print(status if args.json else render_status(status))
        return 0


def _print(answer: object) -> None:
    if isinstance(answer, str):
        print(answer)
    else:
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(answer)) + b"\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------- text


def render_status(status: StatusView) -> str:
    """The status as a few labelled lines and two tables."""
    connection: str = status.connection
    if status.connection_error:
        connection += f" ({status.connection_error})"
    if status.draining:
        sharing = f"paused, waiting for {len(status.jobs)} running job(s) to end"
    elif status.paused:
        sharing = "paused"
    elif status.guard:
        sharing = f"not sharing · {status.guard}: {status.guard_detail}"
    else:
        sharing = "sharing"
    if status.paused and status.pause_reason:
        sharing += f" · {status.pause_reason}"
    lines = [
        f"Node         {status.node_id} · agent {status.agent_version}",
        f"Coordinator  {status.coordinator_url} · {connection}",
        f"State        {sharing}",
        f"Outbox       {status.outbox_depth} message(s) not yet acknowledged",
        f"Today        {status.jobs_done_today} job(s) done",
        "",
    ]
    if status.gpus:
        header = ["GPU", "NAME", "UUID", "HEALTH", "TEMP", "UTIL", "JOB"]
        lines += _table([header, *(_gpu_row(gpu) for gpu in status.gpus)])
    else:
        lines.append("No GPU.")
    lines.append("")
    if status.jobs:
        header = ["JOB", "STATE", "GPUS", "SINCE"]
        rows = [[j.job_id, j.state, ",".join(j.gpus), _time(j.created_at)] for j in status.jobs]
        lines += _table([header, *rows])
    else:
        lines.append("No job running.")
    return "\n".join(lines)


def render_jobs(jobs: Sequence[JobView]) -> str:
    """Jobs as a table, newest first."""
    if not jobs:
        return "No job yet."
    header = ["JOB", "STATE", "GPUS", "CREATED", "UPDATED", "EXIT", "WHY"]
    rows = [
        [
            j.job_id,
            j.shown_state,
            ",".join(j.gpus) or "-",
            _time(j.created_at),
            _time(j.updated_at),
            "-" if j.exit_code is None else str(j.exit_code),
            ": ".join(part for part in (j.code, j.detail) if part),
        ]
        for j in jobs
    ]
    return "\n".join(_table([header, *rows]))


def _gpu_row(gpu: GpuView) -> list[str]:
    health = gpu.health if not gpu.health_reason else f"{gpu.health} ({gpu.health_reason})"
    temperature = "-" if gpu.temperature_c is None else f"{gpu.temperature_c:.0f}°C"
    utilization = "-" if gpu.utilization_pct is None else f"{gpu.utilization_pct:.0f}%"
    return [
        str(gpu.index),
        gpu.name,
        gpu.uuid,
        health,
        temperature,
        utilization,
        gpu.assigned_job or "-",
    ]


def _time(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
