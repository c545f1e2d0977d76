"""The reference coordinator's admission, rate limits, storage quota and retention.

These tests need nothing outside this process; the others are in
tests/integration/test_coordinator_admission.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator import cli
from coordinator.errors import ConfigError
from coordinator.server import Settings


@pytest.mark.parametrize(
    "settings",
    [
        {"frames_per_s": 0},
        {"node_quota_bytes": -1},
        {"new_keys_per_s": float("nan")},
        {"telemetry_keep_s": float("inf")},
        {"admission": "anyone"},
        {"admission": "allow_list"},
        {"admission": "token"},
        {"admission": "token", "enrolment_tokens": frozenset({"short"})},
    ],
)
def test_settings_out_of_range_are_refused_with_a_code(settings: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings(**settings)  # type: ignore[arg-type]
    assert refused.value.code == "bad_setting"


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (["--admission", "token"], "bad_setting"),
        (
            ["--admission", "token", "--enrolment-tokens", "/nonexistent/tokens"],
            "tokens_unreadable",
        ),
        (["--node-quota-mib", "-3"], "bad_setting"),
        (["--telemetry-keep-days", "nan"], "bad_setting"),
    ],
)
def test_serve_refuses_bad_limits_with_exit_2_and_a_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], code: str
) -> None:
    argv = ["serve", "--port", "0", "--db", str(tmp_path / "c.db"), *extra]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert f"error [{code}]" in capsys.readouterr().err
    assert not (tmp_path / "c.db").exists()
