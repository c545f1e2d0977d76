"""``serve --artifacts-port``: a fixed port by default, so that signed upload URLs outlive
a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator import cli
from coordinator.cli_args import artifacts_port, public_url
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


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("https://coord.example.org:8766", "https://coord.example.org:8766"),
        ("http://[::1]:8766/", "http://[::1]:8766"),
    ],
)
def test_an_artifacts_url_is_a_scheme_and_an_authority(given: str, kept: str) -> None:
    assert public_url(given) == kept


@pytest.mark.parametrize(
    "given",
    [
        "ftp://coord.example.org",
        "https://coord.example.org/prefix",
        "https://user:secret@coord.example.org",
        "https://coord.example.org?x=1",
        "https://coord.example.org#x",
        "http://coord.example.org:99999",
        "coord.example.org:8766",
        "http://",
    ],
)
@pytest.mark.parametrize("option", ["--artifacts-url", "--peer-url"])
def test_serve_refuses_an_artifacts_or_peer_url_that_is_not_one_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], given: str, option: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        public_url(given, option)
    assert caught.value.code == "bad_address"
    assert option in str(caught.value)
    argv = ["serve", "--port", "0", "--db", str(tmp_path / "c.db"), option, given]
    assert cli.main([*argv, "--state-dir", str(tmp_path / "state")]) == cli.EXIT_USAGE
    assert "error [bad_address]" in capsys.readouterr().err
    assert not (tmp_path / "c.db").exists()
