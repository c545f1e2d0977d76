"""The agent's configuration file, its environment overrides, and its reference page."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.certs import ca_pem

from agent.config.settings import (
    AgentConfig,
    default_config_path,
    env_var,
    is_system_install,
    load_config,
)
from agent.errors import ConfigError
from agent.protocol import crypto

ROOT = Path(__file__).resolve().parents[2]
KEY = crypto.b64encode(bytes(range(32)))
OTHER_KEY = crypto.b64encode(bytes(range(1, 33)))


@pytest.fixture
def user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's XDG directories under ``tmp_path`` (the runtime one private, as XDG asks)."""
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR"):
        path = tmp_path / name.lower()
        path.mkdir(mode=0o700)
        monkeypatch.setenv(name, str(path))
    return tmp_path


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None, **kw: Any) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load_config(path, env or {}, system=True, **kw)


def _refusal(tmp_path: Path, text: str, env: dict[str, str] | None = None, **kw: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text, env, **kw)
    assert caught.value.code == "bad_config"
    return caught.value.detail


def _fields(struct: Any) -> list[msgspec.structs.FieldInfo]:
    return list(msgspec.structs.fields(struct))


def _sections() -> dict[str, Any]:
    return {field.name: field.type for field in _fields(AgentConfig)}


def _keys() -> set[str]:
    return {
        f"{name}.{field.name}" for name, struct in _sections().items() for field in _fields(struct)
    }


# Defaults and where they come from


def test_an_empty_system_file_gives_the_system_defaults(tmp_path: Path) -> None:
    config = _load(tmp_path, "")
    assert config.paths.state_dir == Path("/var/lib/gpu-agent")
    assert config.paths.jobs_dir == Path("/var/lib/gpu-agent/jobs")
    assert config.paths.control_socket == Path("/run/gpu-agent/agent.sock")
    assert config.control.socket_group == "gpu-agent"
    assert config.control.socket_mode == 0o660
    assert config.coordinator.url is None
    assert config.coordinator.keys == ()
    assert config.telemetry.interval_s == 1.0
    assert config.telemetry.batch == 10
    assert config.jobs.docker_socket == "/var/run/docker.sock"
    assert config.jobs.max_concurrent == 0
    assert config.policy.allowed_images == []
    assert config.metrics.enabled is False
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9464)


def test_a_user_install_without_a_file_uses_the_user_directories(user_dirs: Path) -> None:
    assert default_config_path(False) == user_dirs / "xdg_config_home" / "gpu-agent" / "agent.toml"
    config = load_config(None, {}, system=False)
    assert config.paths.state_dir == user_dirs / "xdg_data_home" / "gpu-agent"
    assert config.paths.jobs_dir == user_dirs / "xdg_data_home" / "gpu-agent" / "jobs"
    assert config.paths.control_socket == user_dirs / "xdg_runtime_dir" / "gpu-agent" / "agent.sock"
    assert config.control.socket_group is None


def test_the_default_user_file_is_read_when_present(user_dirs: Path) -> None:
    path = default_config_path(False)
    path.parent.mkdir(parents=True)
    path.write_text("[telemetry]\nbatch = 3\n")
    assert load_config(None, {}, system=False).telemetry.batch == 3


def test_a_named_file_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: no such file"):
        load_config(tmp_path / "missing.toml", {}, system=True)


def test_the_system_default_path_is_in_etc() -> None:
    assert default_config_path(True) == Path("/etc/gpu-agent/agent.toml")


def test_root_or_a_system_file_makes_a_system_install(tmp_path: Path) -> None:
    absent = tmp_path / "absent.toml"
    present = tmp_path / "agent.toml"
    present.write_text("")
    assert is_system_install(euid=0, system_file=absent)
    assert is_system_install(euid=1000, system_file=present)
    assert not is_system_install(euid=1000, system_file=absent)


# Values from the file


def test_every_section_is_read_from_the_file(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        f"""
        [coordinator]
        url = "wss://coord.example:8443/agent"
        keys = ["{KEY}", "{OTHER_KEY}"]
        [paths]
        state_dir = "/srv/agent"
        runtime_dir = "/run/agent"
        [telemetry]
        interval_s = 0.5
        batch = 20
        [jobs]
        docker_host = "unix:///run/docker.sock"
        user = "1000:1000"
        log_max_bytes = 2048
        max_concurrent = 2
        [policy]
        allowed_images = ["python", "ghcr.io/acme/*"]
        max_gpus = 2
        runtime = "runsc"
        [control]
        socket_group = ""
        socket_mode = 0o600
        [metrics]
        enabled = true
        listen = "[::1]:0"
        """,
    )
    assert config.coordinator.url == "wss://coord.example:8443/agent"
    assert config.coordinator.pinned_keys == {
        crypto.key_id(bytes(range(32))): bytes(range(32)),
        crypto.key_id(bytes(range(1, 33))): bytes(range(1, 33)),
    }
    assert config.paths.jobs_dir == Path("/srv/agent/jobs")
    assert config.paths.control_socket == Path("/run/agent/agent.sock")
    assert (config.telemetry.interval_s, config.telemetry.batch) == (0.5, 20)
    assert config.jobs.docker_socket == "/run/docker.sock"
    assert (config.jobs.user, config.jobs.log_max_bytes, config.jobs.max_concurrent) == (
        "1000:1000",
        2048,
        2,
    )
    assert config.policy.allowed_images == ["python", "ghcr.io/acme/*"]
    assert (config.policy.max_gpus, config.policy.runtime) == (2, "runsc")
    assert (config.control.socket_group, config.control.socket_mode) == (None, 0o600)
    assert (config.metrics.enabled, config.metrics.host, config.metrics.port) == (True, "::1", 0)


def test_plain_ws_is_allowed_on_loopback_or_when_the_file_allows_it(tmp_path: Path) -> None:
    local = _load(tmp_path, '[coordinator]\nurl = "ws://127.0.0.1:8765/agent"')
    assert local.coordinator.url == "ws://127.0.0.1:8765/agent"
    remote = _load(
        tmp_path, '[coordinator]\nurl = "ws://coord.example/agent"\nallow_plaintext = true'
    )
    assert remote.coordinator.allow_plaintext


def test_a_ca_file_must_exist_and_hold_certificates(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    text = f'[coordinator]\nca_file = "{ca}"'
    assert "coordinator.ca_file" in _refusal(tmp_path, text)
    ca.write_text("")
    assert "holds no PEM certificate" in _refusal(tmp_path, text)
    ca.write_bytes(ca_pem())
    assert _load(tmp_path, text).coordinator.ca_file == ca


def test_run_needs_a_coordinator_url_and_a_key(tmp_path: Path) -> None:
    assert "coordinator.url is not set" in _refusal(tmp_path, "", require_coordinator=True)
    no_key = '[coordinator]\nurl = "ws://localhost:1/agent"'
    assert "coordinator.keys is not set" in _refusal(tmp_path, no_key, require_coordinator=True)
    config = _load(tmp_path, f'{no_key}\nkeys = ["{KEY}"]', require_coordinator=True)
    assert config.coordinator.keys == (KEY,)


# The environment


def test_the_environment_beats_the_file(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        '[telemetry]\ninterval_s = 2.0\nbatch = 5\n[coordinator]\nurl = "wss://a.example/x"',
        {
            "GPU_AGENT_TELEMETRY_INTERVAL_S": "0.25",
            "GPU_AGENT_COORDINATOR_URL": "wss://b.example/y",
            "GPU_AGENT_COORDINATOR_KEYS": f"{KEY}, {OTHER_KEY}",
            "GPU_AGENT_PATHS_STATE_DIR": "/srv/state",
            "GPU_AGENT_POLICY_ALLOWED_IMAGES": "python,ghcr.io/acme/*",
            "GPU_AGENT_POLICY_ALLOW_EGRESS": "true",
            "GPU_AGENT_CONTROL_SOCKET_MODE": "0640",
            "GPU_AGENT_CONTROL_SOCKET_GROUP": "",
            "GPU_AGENT_METRICS_ENABLED": "1",
        },
    )
    assert (config.telemetry.interval_s, config.telemetry.batch) == (0.25, 5)
    assert config.coordinator.url == "wss://b.example/y"
    assert config.coordinator.keys == (KEY, OTHER_KEY)
    assert config.paths.jobs_dir == Path("/srv/state/jobs")  # follows the overridden state_dir
    assert config.policy.allowed_images == ["python", "ghcr.io/acme/*"]
    assert config.policy.allow_egress
    assert config.control.socket_mode == 0o640
    assert config.control.socket_group is None
    assert config.metrics.enabled


def test_the_environment_can_allow_what_the_file_alone_would_refuse(tmp_path: Path) -> None:
    text = '[coordinator]\nurl = "ws://coord.example/agent"'
    env = {"GPU_AGENT_COORDINATOR_ALLOW_PLAINTEXT": "true"}
    assert _load(tmp_path, text, env).coordinator.allow_plaintext


def test_variables_that_are_not_config_keys_are_left_alone(tmp_path: Path) -> None:
    hal_vars = set(re.findall(r'"(GPU_AGENT_\w+)"', (ROOT / "hal/backend.py").read_text()))
    assert hal_vars >= {"GPU_AGENT_SYSFS_ROOT", "GPU_AGENT_NVML_LIB"}
    env = dict.fromkeys([*hal_vars, "GPU_AGENT_REQUIRE_DOCKER", "DOCKER_HOST", "HOME"], "x")
    assert _load(tmp_path, "", env) == _load(tmp_path, "")


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        (
            {"GPU_AGENT_TELEMETRY_INTERVAL_S": "soon"},
            ["GPU_AGENT_TELEMETRY_INTERVAL_S='soon'", "telemetry.interval_s", "float"],
        ),
        (
            {"GPU_AGENT_TELEMETRY_INTERVAL_S": "0"},
            ["GPU_AGENT_TELEMETRY_INTERVAL_S='0'", "telemetry.interval_s", "> 0"],
        ),
        (
            {"GPU_AGENT_TELEMETRY_INTERVAL": "1"},
            ["GPU_AGENT_TELEMETRY_INTERVAL", "telemetry.interval", "unknown key"],
        ),
        (
            {"GPU_AGENT_METRICS_ENABLED": "yes"},
            ["GPU_AGENT_METRICS_ENABLED='yes'", "metrics.enabled", "bool"],
        ),
        (
            {"GPU_AGENT_CONTROL_SOCKET_MODE": "rw"},
            ["GPU_AGENT_CONTROL_SOCKET_MODE='rw'", "control.socket_mode", "octal"],
        ),
        (
            {"GPU_AGENT_METRICS_LISTEN": "0.0.0.0:9464"},
            ["GPU_AGENT_METRICS_LISTEN='0.0.0.0:9464'", "metrics.listen", "loopback"],
        ),
        (
            {"GPU_AGENT_COORDINATOR_URL": "ws://coord.example/agent"},
            ["GPU_AGENT_COORDINATOR_URL=", "coordinator.url", "forge"],
        ),
        (
            {"GPU_AGENT_POLICY_ALLOWED_IMAGES": "python,python:3"},
            ["GPU_AGENT_POLICY_ALLOWED_IMAGES=", "policy.allowed_images[1]", "not a tag"],
        ),
        (
            {"GPU_AGENT_POLICY_RUNTIME": "kata"},
            ["GPU_AGENT_POLICY_RUNTIME='kata'", "policy.runtime", "Invalid enum value"],
        ),
    ],
)
def test_a_bad_variable_is_refused_by_name_and_key(
    tmp_path: Path, env: dict[str, str], fragments: list[str]
) -> None:
    detail = _refusal(tmp_path, "", env)
    for fragment in fragments:
        assert fragment in detail


def test_a_fault_of_file_and_variable_together_names_both(tmp_path: Path) -> None:
    text = '[coordinator]\nurl = "ws://coord.example/agent"\nallow_plaintext = true'
    detail = _refusal(tmp_path, text, {"GPU_AGENT_COORDINATOR_ALLOW_PLAINTEXT": "false"})
    assert detail.startswith(
        f"{tmp_path / 'agent.toml'} with GPU_AGENT_COORDINATOR_ALLOW_PLAINTEXT"
    )
    assert "coordinator.url" in detail


# Bad files


@pytest.mark.parametrize(
    ("text", "key", "fault"),
    [
        ("[telemetry]\ninterval_s = 'fast'", "telemetry.interval_s", "Expected `float`, got `str`"),
        ("[telemetry]\nbatch = 0", "telemetry.batch", ">= 1"),
        ("[telemetry]\nbatch = 601", "telemetry.batch", "<= 600"),
        ("[telemetry]\nintervl_s = 1.0", "telemetry.intervl_s", "unknown key"),
        ("[telemetri]\ninterval_s = 1.0", "telemetri", "unknown section"),
        ("interval_s = 1.0", "interval_s", "outside any section"),
        ("telemetry = 1", "telemetry", "Expected `object`"),
        ("[coordinator]\nurl = 'https://coord.example/agent'", "coordinator.url", "use ws://"),
        ("[coordinator]\nurl = 'ws://coord.example/agent'", "coordinator.url", "wss://"),
        ("[coordinator]\nurl = 'ws://10.0.0.1/agent'", "coordinator.url", "forge"),
        ("[coordinator]\nkeys = ['not base64!']", "coordinator.keys[0]", "not base64"),
        ("[coordinator]\nkeys = ['AAAA']", "coordinator.keys[0]", "32-byte Ed25519"),
        ("[coordinator]\nkeys = 'AAAA'", "coordinator.keys", "Expected `array`"),
        ("[paths]\nstate_dir = 'var/lib'", "paths.state_dir", "absolute"),
        ("[paths]\nstate_dir = 3", "paths.state_dir", "Expected `Path`, got `int`"),
        ("[jobs]\ndocker_host = 'tcp://10.0.0.1:2375'", "jobs.docker_host", "unix://"),
        ("[jobs]\nuser = 'nobody'", "jobs.user", "uid:gid"),
        ("[jobs]\nruntime = 'runsc'", "jobs.runtime", "unknown key"),
        ("[jobs]\nlog_rate_bytes_per_s = 0", "jobs.log_rate_bytes_per_s", ">= 1"),
        ("[policy]\nallowed_images = ['python:3.12']", "policy.allowed_images[0]", "not a tag"),
        ("[policy]\nmax_gpu = 1", "policy.max_gpu", "unknown key"),
        ("[control]\nsocket_mode = 0o666", "control.socket_mode", "every local user"),
        ("[metrics]\nlisten = '0.0.0.0:9464'", "metrics.listen", "not a loopback address"),
        ("[metrics]\nlisten = '192.168.1.5:9464'", "metrics.listen", "not a loopback address"),
        ("[metrics]\nlisten = '9464'", "metrics.listen", "host:port"),
        ("[metrics]\nlisten = 'localhost:70000'", "metrics.listen", "out of range"),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_and_the_key(
    tmp_path: Path, text: str, key: str, fault: str
) -> None:
    detail = _refusal(tmp_path, text)
    assert detail.startswith(f"{tmp_path / 'agent.toml'}: {key}: ")
    assert fault in detail


def test_a_file_that_is_not_toml_is_refused_with_its_line(tmp_path: Path) -> None:
    detail = _refusal(tmp_path, "[telemetry]\ninterval_s = = 1\n")
    assert detail.startswith(f"{tmp_path / 'agent.toml'}: not valid TOML")
    assert "line 2" in detail


def test_a_file_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"agent\.toml: cannot read: not UTF-8"):
        load_config(tmp_path / "agent.toml", {}, system=True)


# The reference page and the sample file


def _documented() -> dict[str, tuple[str, str]]:
    """``section.key -> (default cell, variable)`` from docs/configuration.md."""
    section = ""
    found: dict[str, tuple[str, str]] = {}
    for line in (ROOT / "docs/configuration.md").read_text().splitlines():
        if heading := re.fullmatch(r"### `\[(\w+)\]`", line):
            section = heading.group(1)
        elif row := re.fullmatch(r"\| `(\w+)` \|[^|]*\| ([^|]*) \| `(\w+)` \|[^|]*\|", line):
            key, default, var = row.groups()
            assert section, f"{key} is documented outside a section"
            assert f"{section}.{key}" not in found, f"{section}.{key} is documented twice"
            found[f"{section}.{key}"] = (default, var)
    return found


def test_every_key_is_documented_and_every_documented_key_exists() -> None:
    assert set(_documented()) == _keys()


def test_the_documented_variables_are_the_ones_read() -> None:
    for dotted, (_, var) in _documented().items():
        assert var == env_var(*dotted.split(".")), dotted


def test_the_documented_defaults_are_the_real_ones() -> None:
    documented = _documented()
    for name, struct in _sections().items():
        for field in _fields(struct):
            key = f"{name}.{field.name}"
            cell = documented[key][0]
            if field.default_factory is not msgspec.NODEFAULT:
                default = field.default_factory()
            elif field.default is msgspec.NODEFAULT or key == "control.socket_group":
                # These depend on the kind of install, or on another key.
                assert "system:" in cell or "state_dir" in cell, key
                continue
            else:
                default = field.default
            if default is None:
                assert cell == "none", key
                continue
            literal = re.match(r"`([^`]*)`", cell)
            assert literal, f"{key}: default {cell!r} is not a TOML literal"
            value = tomllib.loads(f"v = {literal.group(1)}")["v"]
            assert value == msgspec.json.decode(msgspec.json.encode(default)), key


def _uncommented(text: str) -> str:
    """The sample file with every commented-out section and key switched on."""
    example = re.compile(r"#\s?(\[\w+\]|\w+ = .*)")
    return "\n".join(
        match.group(1) if (match := example.fullmatch(line)) else line for line in text.splitlines()
    )


def test_the_sample_file_is_valid_as_shipped(tmp_path: Path) -> None:
    _load(tmp_path, (ROOT / "packaging/agent.toml").read_text())


def test_the_sample_file_shows_every_key_with_a_valid_example(tmp_path: Path) -> None:
    text = _uncommented((ROOT / "packaging/agent.toml").read_text())
    raw = tomllib.loads(text)
    shown = {f"{section}.{key}" for section, table in raw.items() for key in table}
    assert shown == _keys()
    (tmp_path / "ca.pem").write_bytes(ca_pem())
    text = re.sub(r'ca_file = ".*"', f'ca_file = "{tmp_path / "ca.pem"}"', text)
    _load(tmp_path, text)
