"""The reference coordinator against the findings of an adversarial review: storage that
grows without bound, settings and files read without limit, a client that waits for ever,
and a CLI that dies on a closed pipe. Real coordinator on 127.0.0.1:0, real SQLite.

These tests need nothing outside this process; the others are in
tests/integration/test_coordinator_review.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.nodes import Node

from coordinator import cli
from coordinator.admission import read_tokens
from coordinator.errors import ConfigError
from coordinator.retention import Quotas
from coordinator.server import Settings
from coordinator.store import Store

Capsys = pytest.CaptureFixture[str]


_MIB = 1024 * 1024


def test_a_message_rolled_back_does_not_count_against_the_store_cap(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db", Quotas(store_bytes=100))
    try:
        store.nodes.seen("node-1", "key", 0.0)
        assert store.add("node-1", 1, "telemetry", {"samples": ["x" * 30]}, 1.0) == "stored"
        held = store.retention.stored_bytes("node-1")
        # Stored and counted, then its profile fails to encode: the whole add rolls back.
        with pytest.raises(TypeError):
            store.add("node-1", 2, "profile", {"p": "y" * 30}, 2.0, profile={"x": object()})
        assert store.retention.stored_bytes("node-1") == held
        # It fills the cap to the byte beside the telemetry: only if the rolled-back bytes
        # are not counted (else the telemetry is evicted to make room).
        fill = {"s": "z" * (100 - held - len(b'{"s":""}'))}
        assert store.add("node-1", 2, "node_status", fill, 3.0) == "stored"
        assert store.nodes.all_seqs("node-1") == [1, 2]
    finally:
        store.close()


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _sparse(path: Path) -> Path:
    with path.open("wb") as file:
        file.truncate(2 * 1024 * _MIB)  # 2 GiB of holes: nothing on disk, all read whole
    return path


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda tmp: Path("/dev/zero"), id="device"),
        pytest.param(lambda tmp: _fifo(tmp / "fifo"), id="fifo"),
        pytest.param(lambda tmp: _sparse(tmp / "sparse"), id="huge"),
        pytest.param(lambda tmp: tmp, id="directory"),
    ],
)
def test_serve_refuses_a_tokens_file_that_is_no_small_regular_file(
    tmp_path: Path, capsys: Capsys, make: object
) -> None:
    tokens = make(tmp_path)  # type: ignore[operator]
    argv = ["serve", "--port", "0", "--db", str(tmp_path / "c.db")]
    argv += ["--admission", "token", "--enrolment-tokens", str(tokens)]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "error [tokens_unreadable]" in err
    assert "Traceback" not in err
    assert not (tmp_path / "c.db").exists()


def test_a_small_tokens_file_is_read_one_token_a_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# enrolment\n\n" + "a" * 16 + "\n  " + "b" * 20 + "  \n")
    assert read_tokens(path) == {"a" * 16, "b" * 20}


def _serve(tmp_path: Path, *extra: str) -> list[str]:
    return ["serve", "--port", "0", "--db", str(tmp_path / "c.db"), *extra]


@pytest.mark.parametrize(
    "extra",
    [
        ["--telemetry-keep-rows", "99999999999999999999999"],
        ["--telemetry-keep-rows", "0"],
        ["--telemetry-keep-rows", "-1"],
        ["--node-quota-mib", "1e300"],
        ["--node-quota-mib", "0"],
        ["--unverified-quota-mib", "1e300"],
        ["--store-max-mib", "1e300"],
        ["--store-max-mib", "0"],
        ["--telemetry-keep-days", "1e300"],
        ["--telemetry-keep-days", "0"],
    ],
)
def test_serve_refuses_a_setting_sqlite_cannot_hold_or_that_means_nothing(
    tmp_path: Path, capsys: Capsys, extra: list[str]
) -> None:
    assert cli.main(_serve(tmp_path, *extra)) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "error [bad_setting]" in err
    assert "Traceback" not in err
    assert not (tmp_path / "c.db").exists()


@pytest.mark.parametrize(
    "setting",
    ["telemetry_keep_rows", "node_quota_bytes", "store_max_bytes", "frames_burst"],
)
def test_settings_past_what_sqlite_holds_are_refused(setting: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings(**{setting: 2**63})  # type: ignore[arg-type]
    assert refused.value.code == "bad_setting"


@pytest.mark.parametrize(
    "extra",
    [
        ["--admission", "allow_list", "--allow", "garbage"],
        ["--admission", "allow_list", "--allow", Node().node_id, "--allow", "node-"],
        ["--admission", "allow_list", "--allow", "AAAA"],  # base64, not 32 bytes
        ["--admission", "open", "--allow", Node().node_id],
        ["--allow", Node().node_id],  # open by default
    ],
    ids=["garbage", "one-bad", "short-key", "open-with-allow", "default-with-allow"],
)
def test_serve_refuses_an_allow_list_entry_or_mode_that_would_not_hold(
    tmp_path: Path, capsys: Capsys, extra: list[str]
) -> None:
    assert cli.main(_serve(tmp_path, *extra)) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "error [bad_setting]" in err
    assert not (tmp_path / "c.db").exists()


def test_serve_refuses_enrolment_tokens_with_another_mode(tmp_path: Path, capsys: Capsys) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("t" * 20 + "\n")
    argv = _serve(tmp_path, "--admission", "open", "--enrolment-tokens", str(tokens))
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "error [bad_setting]" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["key", "--state-dir", "", "--create"],
        ["key", "--state-dir", ""],
        ["jobs", "--state-dir", ""],
        ["serve", "--port", "0", "--db", "x.db", "--state-dir", ""],
        ["serve", "--port", "0", "--db", ""],
    ],
    ids=["key-create", "key", "jobs", "serve", "serve-db"],
)
def test_an_empty_path_is_refused_not_taken_as_the_current_directory(
    tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == cli.EXIT_USAGE
    assert "error [bad_argument]" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("create", [True, False])
def test_key_with_a_file_for_state_dir_is_a_usage_error(
    tmp_path: Path, capsys: Capsys, create: bool
) -> None:
    file = tmp_path / "passwd"
    file.write_text("root:x:0:0::/root:/bin/sh\n")
    argv = ["key", "--state-dir", str(file), *(["--create"] if create else [])]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "error [bad_state_dir]" in err
    assert file.read_text() == "root:x:0:0::/root:/bin/sh\n"
