"""The pure rules of fetching inputs: redirects, statuses, the cache's settings and floor."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config.settings import load_config
from agent.errors import ConfigError, InputError
from agent.inputs.cache import InputCache
from agent.inputs.fetch import redirect_target, status_error

HOSTS = ["*.example.org", "127.0.0.1"]


@pytest.mark.parametrize(
    ("current", "location", "target"),
    [
        ("https://a.example.org/m", "/other", "https://a.example.org/other"),
        ("https://a.example.org/m", "https://b.example.org/m", "https://b.example.org/m"),
        ("http://127.0.0.1:8/m", "https://a.example.org/m", "https://a.example.org/m"),
        ("http://127.0.0.1:8/m", "http://127.0.0.1:9/m", "http://127.0.0.1:9/m"),
    ],
)
def test_a_redirect_within_allowed_hosts_is_followed(
    current: str, location: str, target: str
) -> None:
    assert redirect_target(current, location, HOSTS) == target


@pytest.mark.parametrize(
    ("current", "location", "code"),
    [
        ("https://a.example.org/m", "http://a.example.org/m", "input_redirect_refused"),
        ("https://a.example.org/m", "https://evil.test/m", "input_redirect_refused"),
        ("https://a.example.org/m", "//evil.test/m", "input_redirect_refused"),
        ("https://a.example.org/m", "file:///etc/shadow", "input_scheme_refused"),
        ("https://a.example.org/m", "https://u:p@b.example.org/m", "input_redirect_refused"),
        ("https://a.example.org/m", "https://evil.test\\.example.org/m", "input_redirect_refused"),
        ("http://127.0.0.1/m", "gopher://127.0.0.1/m", "input_scheme_refused"),
    ],
)
def test_a_redirect_elsewhere_or_down_to_http_is_refused(
    current: str, location: str, code: str
) -> None:
    with pytest.raises(InputError) as caught:
        redirect_target(current, location, HOSTS)
    assert caught.value.code == code


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (200, None),
        (404, "input_not_found"),
        (410, "input_not_found"),
        (500, "input_http_error"),
        (206, "input_http_error"),
        (403, "input_http_error"),
    ],
)
def test_each_status_has_its_code(status: int, code: str | None) -> None:
    error = status_error(status, "https://a.example.org/m")
    assert (error.code if error else None) == code


async def test_an_input_larger_than_the_free_disk_is_disk_full(tmp_path: Path) -> None:
    cache = InputCache(tmp_path / "inputs", 1 << 60)
    cache.open()
    called = []

    async def fill(fd: int) -> None:
        called.append(fd)

    with pytest.raises(InputError) as caught:
        async with cache.use("ab" * 32, 1 << 59, fill):
            pass
    assert caught.value.code == "disk_full"
    assert called == []
    assert cache.used_bytes == 0


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("inputs_max_bytes = -1", "cache.inputs_max_bytes"),
        ("inputs_max_bytes = 2000000000000000000", "cache.inputs_max_bytes"),
        ("input_stall_s = 0", "cache.input_stall_s"),
        ("input_deadline_s = -3", "cache.input_deadline_s"),
        ("inputs_dir = '/x'", "cache.inputs_dir"),
    ],
)
def test_a_bad_cache_setting_is_a_coded_config_error(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f"[cache]\n{text}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {}, system=True)
    assert caught.value.code == "bad_config"
    assert key in caught.value.detail


def test_the_cache_settings_are_read_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("")
    env = {"GPU_AGENT_CACHE_INPUTS_MAX_BYTES": "1024", "GPU_AGENT_CACHE_INPUT_STALL_S": "2.5"}
    config = load_config(path, env, system=True)
    assert (config.cache.inputs_max_bytes, config.cache.input_stall_s) == (1024, 2.5)
