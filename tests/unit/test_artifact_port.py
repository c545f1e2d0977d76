"""``serve --artifacts-port``: a fixed port by default, so that signed upload URLs outlive
a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator import cli
from coordinator.cli_args import artifacts_port
from coordinator.errors import ConfigError


@pytest.mark.parametrize(
    ("port", "given", "chosen"),
    [
        (8765, None, 8766),  # the defaults: next to the websocket's port
        (9000, None, 9001),  # follows a coordinator moved to another port
        (0, None, 0),  # any free port for both
        (8765, 0, 0),  # asked for: any free one
        (8765, 7000, 7000),
    ],
)
def test_the_artifact_port_is_the_one_after_the_websockets_unless_given(
    port: int, given: int | None, chosen: int
) -> None:
    assert artifacts_port(port, given) == chosen


def test_no_default_artifact_port_after_65535_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        artifacts_port(65535, None)
    assert caught.value.code == "bad_address"
    argv = ["serve", "--port", "65535", "--db", str(tmp_path / "c.db")]
    assert cli.main([*argv, "--state-dir", str(tmp_path / "state")]) == cli.EXIT_USAGE
    assert "error [bad_address]" in capsys.readouterr().err
    assert not (tmp_path / "c.db").exists()
