"""The control commands' arguments (``gpu-agent status``, ``pause``, ...).

Apart from :mod:`agent.control.cli`, which runs them, so that building ``gpu-agent``'s
parser costs no more than argparse: ``gpu-agent profile`` must start fast.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Final

__all__ = ["COMMANDS", "MAX_JOBS_LIMIT", "MAX_JOB_ID_CHARS", "add_commands", "socket_arg"]

COMMANDS: Final = ("status", "pause", "resume", "jobs", "logs")
#: The most jobs one ``jobs`` call lists (agent.control.wire checks the same bound).
MAX_JOBS_LIMIT: Final = 1000
#: The longest job id ``logs`` takes (agent.control.wire checks the same bound).
MAX_JOB_ID_CHARS: Final = 128
#: How long a command waits for the daemon's answer unless told (--timeout).
_TIMEOUT_S: Final = 10.0
_MAX_TIMEOUT_S: Final = 3600.0
#: sizeof(sockaddr_un.sun_path) less its terminating NUL (as agent.control.socket_file says).
_SUN_PATH_MAX: Final = 107


def _job_id(text: str) -> str:
    if not 1 <= len(text) <= MAX_JOB_ID_CHARS:
        raise argparse.ArgumentTypeError(f"a job id has 1 to {MAX_JOB_ID_CHARS} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not UTF-8 text") from None
    return text


def socket_arg(text: str) -> Path:
    """An argparse type: a control socket path, never an empty one nor one too long to reach."""
    if not text:
        # Path("") is ".": not a socket anyone meant.
        raise argparse.ArgumentTypeError("an empty path")
    if len(os.fsencode(text)) > _SUN_PATH_MAX:
        # No socket can be reached there: a usage error, not "the daemon is not running".
        raise argparse.ArgumentTypeError(
            f"{len(os.fsencode(text))} bytes: too long for a unix socket (at most {_SUN_PATH_MAX})"
        )
    return Path(text)


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= _MAX_TIMEOUT_S:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and at most 3600")
    return value


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_JOBS_LIMIT:
        raise argparse.ArgumentTypeError(f"{text!r} must be from 1 to {MAX_JOBS_LIMIT}")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """Seconds from ``90s``, ``30m``, ``1h``, ``2d`` (or a bare number of seconds)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m or 1h") from None
    if not 0 < value <= 366 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and at most a year")
    return value


def add_commands(
    subparsers: argparse._SubParsersAction[Any], parser_class: type[argparse.ArgumentParser]
) -> None:
    """Add the control commands to ``gpu-agent``'s subcommands (``dest="command"``)."""
    common = parser_class(add_help=False)
    common.add_argument(
        "--socket",
        type=socket_arg,
        metavar="PATH",
        help="the agent's control socket (default: /run/gpu-agent/agent.sock if it "
        "exists, else the one in your runtime directory)",
    )
    common.add_argument(
        "--timeout",
        type=_timeout,
        default=_TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for the agent's answer (default: {_TIMEOUT_S:g}); "
        "pause --drain and logs --follow then wait as long as the jobs take",
    )
    as_json = {"action": "store_true", "help": "print the answer as JSON"}

    status = subparsers.add_parser(
        "status", parents=[common], help="the running agent: coordinator, GPUs, jobs"
    )
    status.add_argument("--json", **as_json)

    pause = subparsers.add_parser("pause", parents=[common], help="stop taking new jobs")
    pause.add_argument(
        "--drain", action="store_true", help="also wait until the running jobs have ended"
    )
    pause.add_argument(
        "--for",
        dest="duration",
        type=_duration,
        metavar="DURATION",
        help="resume by itself after this long: 90s, 30m, 1h, 2d",
    )
    pause.add_argument("--json", **as_json)

    resume = subparsers.add_parser("resume", parents=[common], help="take jobs again")
    resume.add_argument("--json", **as_json)

    jobs = subparsers.add_parser("jobs", parents=[common], help="the most recent jobs")
    jobs.add_argument("--limit", type=_limit, default=20, metavar="N", help="default: 20")
    jobs.add_argument("--json", **as_json)

    logs = subparsers.add_parser("logs", parents=[common], help="a job's output")
    logs.add_argument("job_id", type=_job_id, metavar="JOB")
    logs.add_argument(
        "--follow", "-f", action="store_true", help="keep printing until the job ends"
    )
