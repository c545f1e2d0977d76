"""Registry credentials for image pulls: a private file, checked, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config.files import read_registry_logins
from agent.errors import ConfigError
from agent.jobs.images import engine_logins
from sandbox.runner import RunnerConfig

SECRET = "hunter2-do-not-print"


def _file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "registries.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def _refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        read_registry_logins(path)
    assert caught.value.code == "bad_config"
    assert SECRET not in str(caught.value)
    return caught.value.detail


def test_logins_are_read_by_registry_host_and_never_shown(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        f'[registry."127.0.0.1:5000"]\nusername = "puller"\npassword = "{SECRET}"\n'
        f'[registry."registry.example.com"]\nusername = "u"\npassword = "p"\n',
    )
    logins = read_registry_logins(path)
    assert sorted(logins) == ["127.0.0.1:5000", "registry.example.com"]
    login = engine_logins(logins)["127.0.0.1:5000"]
    assert (login.username, login.password, login.serveraddress) == (
        "puller",
        SECRET,
        "127.0.0.1:5000",
    )
    # Not in what a log line or an error would print of the runner's settings.
    assert SECRET not in repr(login)
    assert SECRET not in repr(logins)
    assert SECRET not in repr(RunnerConfig(jobs_dir=tmp_path, registry_auth=engine_logins(logins)))


def test_a_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, f'[registry."h"]\nusername = "u"\npassword = "{SECRET}"\n', 0o644)
    assert "open to group or others" in _refusal(path)


@pytest.mark.parametrize(
    "text",
    [
        '[registry."h"]\nusername = "u"\n',  # no password
        f'[registry."h"]\nusername = "u"\npassword = "{SECRET}"\nextra = 1\n',
        f'[registry."Bad Host!"]\nusername = "u"\npassword = "{SECRET}"\n',
        f'[registries."h"]\nusername = "u"\npassword = "{SECRET}"\n',
        f'[registry."h"]\nusername = "u"\npassword = "{SECRET}\n',  # not TOML
        f'[registry."h"]\nusername = ""\npassword = "{SECRET}"\n',
    ],
)
def test_a_file_of_another_shape_is_refused_without_quoting_it(tmp_path: Path, text: str) -> None:
    _refusal(_file(tmp_path, text))


def test_a_missing_or_endless_file_is_refused(tmp_path: Path) -> None:
    assert "no such file" in _refusal(tmp_path / "none.toml")
    assert _refusal(Path("/dev/zero"))
