"""The reference coordinator's admission, rate limits, storage quota and retention.

These tests need nothing outside this process; the others are in
tests/integration/test_coordinator_admission.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from coordinator import admission, cli
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
        (["--artifacts-keep-days", "nan"], "bad_setting"),
        (["--artifacts-keep-days", "0"], "bad_setting"),
        (["--artifacts-keep-days", "-1"], "bad_setting"),
        (["--artifacts-keep-days", "1e300"], "bad_setting"),
        (["--artifacts-max-gib", "0"], "bad_setting"),
        (["--artifacts-max-gib", "nan"], "bad_setting"),
        (["--artifacts-max-gib", "1e300"], "bad_setting"),
        (["--attest-max-age-minutes", "0"], "bad_setting"),
        (["--attest-max-age-minutes", "-5"], "bad_setting"),
        (["--attest-max-age-minutes", "nan"], "bad_setting"),
        (["--attest-max-age-minutes", "inf"], "bad_setting"),
        (["--attest-max-age-minutes", "1e300"], "bad_setting"),
    ],
)
def test_serve_refuses_bad_limits_with_exit_2_and_a_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], code: str
) -> None:
    argv = ["serve", "--port", "0", "--db", str(tmp_path / "c.db"), *extra]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert f"error [{code}]" in capsys.readouterr().err
    assert not (tmp_path / "c.db").exists()


def test_artifacts_keep_days_sets_the_artifact_retention_and_defaults_to_a_week() -> None:
    parser = argparse.ArgumentParser()
    admission.add_options(parser)
    assert admission.settings_from(parser.parse_args([])).artifacts_keep_s == 7 * 86400
    given = parser.parse_args(["--artifacts-keep-days", "1.5"])
    assert admission.settings_from(given).artifacts_keep_s == 1.5 * 86400


def test_artifacts_max_gib_sets_a_byte_budget_and_there_is_none_by_default() -> None:
    parser = argparse.ArgumentParser()
    admission.add_options(parser)
    assert admission.settings_from(parser.parse_args([])).artifacts_max_bytes is None
    given = parser.parse_args(["--artifacts-max-gib", "0.5"])
    assert admission.settings_from(given).artifacts_max_bytes == 1 << 29


def test_new_keys_per_s_sets_the_enrolment_rate_and_a_bad_one_is_refused() -> None:
    parser = argparse.ArgumentParser()
    admission.add_options(parser)
    assert admission.settings_from(parser.parse_args([])).new_keys_per_s == 5.0
    given = parser.parse_args(["--new-keys-per-s", "1000"])
    assert admission.settings_from(given).new_keys_per_s == 1000.0
    with pytest.raises(ConfigError) as caught:
        admission.settings_from(parser.parse_args(["--new-keys-per-s", "-1"]))
    assert caught.value.code == "bad_setting"


def test_attest_max_age_minutes_sets_how_long_a_verified_profile_stands_default_an_hour() -> None:
    parser = argparse.ArgumentParser()
    admission.add_options(parser)
    assert admission.settings_from(parser.parse_args([])).attest_max_age_s == 3600.0
    given = parser.parse_args(["--attest-max-age-minutes", "15"])
    assert admission.settings_from(given).attest_max_age_s == 900.0
