"""What the unit and the integration test_coordinator_cli_hostile.py share."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import pytest

from coordinator import cli

__all__ = ["Capsys", "main", "refused", "run"]

Capsys = pytest.CaptureFixture[str]


def refused(capsys: Capsys, status: int, code: str) -> Callable[[int], None]:
    """A check that ``main`` returned ``status`` and said ``code``, in the CLI's format."""

    def check(returned: int) -> None:
        err = capsys.readouterr().err
        assert returned == status, err
        # argparse's own errors name the command: "gpu-coordinator submit: error [...]".
        assert re.match(rf"gpu-coordinator( [a-z]+)?: error \[{code}\]: ", err), err
        assert "Traceback" not in err

    return check


def run(argv: list[str]) -> int:
    """``cli.main``'s exit status, also when argparse exits."""
    try:
        return cli.main(argv)
    except SystemExit as exit_:
        return int(str(exit_.code))


async def main(*argv: str) -> int:
    """:func:`run` in a thread: it blocks, and the coordinator runs on this loop."""
    return await asyncio.to_thread(run, list(argv))
