"""``gpu-agent``, its configuration and its control API fed what a user should not give them.

Every refusal is one coded line (``gpu-agent: error [code]: ...``), exit status 2 for a
usage or configuration fault, no traceback, and nothing created or changed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from support.certs import ca_pem
from support.cli import run_cli

from agent.config.settings import NOT_CONFIG_VARIABLES, AgentConfig, Flag, env_var, load_config
from agent.errors import ConfigError
from agent.link.identity import load_or_create
from agent.protocol import crypto
from agent.tray.main import display_problem

ROOT = Path(__file__).resolve().parents[2]
KEY = crypto.b64encode(bytes(range(32)))
URL = "ws://127.0.0.1:1/agent"


def _refused(result: subprocess.CompletedProcess[str], code: str, *fragments: str) -> None:
    """One coded line, exit status 2, no traceback, nothing on stdout."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(rf"^gpu-agent[a-z -]*: error \[{code}\]: ", result.stderr, re.MULTILINE)
    for fragment in fragments:
        assert fragment in result.stderr
    assert result.stdout == ""


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    """An empty configuration file, named on each command line (no /etc file is read)."""
    path = tmp_path / "agent.toml"
    path.write_text("")
    return path


def _daemon(conf: Path, *args: str) -> list[str]:
    state = conf.parent / "state"
    return ["run", "--config", str(conf), "--state-dir", str(state), *args]


def _load(conf: Path, *flags: Flag, env: dict[str, str] | None = None) -> None:
    load_config(conf, env or {}, system=True, flags=flags)


# ---------------------------------------------------------------------- 1. settings that never work


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--coordinator", "ws://127.0.0.1:99999/agent"], ["coordinator.url", "port"]),
        (["--coordinator", "ws://127.0.0.1:0/agent"], ["coordinator.url", "port"]),
        (["--coordinator", "ws://127.0.0.1:http/agent"], ["coordinator.url", "port"]),
        (["--coordinator", "ws://127.0.0.1:1/\udcff"], ["coordinator.url", "undecodable"]),
        (["--coordinator", "ws://127.0.0.1:1/a b"], ["coordinator.url", "spaces"]),
        (["--coordinator", "ws://[::1/agent"], ["coordinator.url", "IPv6"]),
        (["--coordinator", "ws://127.0.0.1:1/a#top"], ["coordinator.url", "fragment"]),
        (["--ca-file", "/nonexistent/ca.pem"], ["--ca-file", "does not exist"]),
        (["--ca-file", "/etc/passwd"], ["--ca-file", "no PEM certificate"]),
        (["--ca-file", "/dev/zero"], ["--ca-file", "not a regular file"]),
        (["--interval", "inf"], ["--interval='inf'", "telemetry.interval_s"]),
        (["--interval", "nan"], ["--interval='nan'", "telemetry.interval_s"]),
        (["--interval", "0"], ["--interval='0'", "telemetry.interval_s"]),
        (["--batch", "0"], ["--batch='0'", "telemetry.batch", ">= 1"]),
        (["--batch", "100000"], ["--batch='100000'", "telemetry.batch", "<= 600"]),
        (["--coordinator-key", "AAAA"], ["--coordinator-key", "32-byte"]),
    ],
)
def test_run_refuses_a_setting_that_can_never_work_at_start(
    conf: Path, args: list[str], fragments: list[str]
) -> None:
    head = [] if "--coordinator" in args else ["--coordinator", URL]
    keys = [] if "--coordinator-key" in args else ["--coordinator-key", KEY]
    _refused(run_cli(*_daemon(conf, *head, *keys, *args)), "bad_config", *fragments)


@pytest.mark.parametrize(
    ("text", "env", "fragment"),
    [
        ('[coordinator]\nurl = "wss://c.example:99999/agent"', {}, "port"),
        ("", {"GPU_AGENT_COORDINATOR_URL": "wss://c.example:99999/agent"}, "port"),
        ("[telemetry]\ninterval_s = inf", {}, "<= 3600"),
        ("", {"GPU_AGENT_TELEMETRY_INTERVAL_S": "1e309"}, "telemetry.interval_s"),
        ('[coordinator]\nca_file = "/etc/passwd"', {}, "no PEM certificate"),
        ('[paths]\nstate_dir = "/tmp/a\\u0000b"', {}, "NUL"),
        ('[coordinator]\nca_file = "/tmp/a\\u0000b"', {}, "NUL"),
        ('[control]\nsocket_group = "a\\u0000b"', {}, "NUL"),
        ('[jobs]\ndocker_host = "unix:///a\\u0000b"', {}, "NUL"),
        ("", {"GPU_AGENT_COORDINATOR_CA_FILE": "/etc/passwd"}, "no PEM certificate"),
    ],
)
def test_the_file_and_the_environment_are_held_to_the_same_checks_as_the_options(
    conf: Path, text: str, env: dict[str, str], fragment: str
) -> None:
    conf.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        _load(conf, env=env)


def test_a_ca_file_is_accepted_alike_from_the_option_the_file_and_the_environment(
    conf: Path,
) -> None:
    ca = conf.parent / "ca.pem"
    ca.write_bytes(ca_pem())
    _load(conf, Flag("--ca-file", "coordinator.ca_file", str(ca)))
    _load(conf, env={"GPU_AGENT_COORDINATOR_CA_FILE": str(ca)})
    conf.write_text(f'[coordinator]\nca_file = "{ca}"')
    _load(conf)


def test_an_option_beats_the_environment_which_beats_the_file(conf: Path) -> None:
    conf.write_text("[telemetry]\ninterval_s = 5.0\nbatch = 3")
    env = {"GPU_AGENT_TELEMETRY_INTERVAL_S": "4"}
    config = load_config(
        conf, env, system=True, flags=[Flag("--interval", "telemetry.interval_s", "2")]
    )
    assert (config.telemetry.interval_s, config.telemetry.batch) == (2.0, 3)


# ---------------------------------------------------------------------- 2. tracebacks


@pytest.mark.parametrize("interval", ["inf", "1e309", "nan", "86401"])
def test_sample_refuses_an_interval_no_sleep_takes(interval: str) -> None:
    _refused(run_cli("sample", "--interval", interval), "bad_argument", "--interval")


@pytest.mark.parametrize("value", ["1e309", "inf", "nan", "-1", "0", "garbage", "3601"])
def test_a_discovery_timeout_no_wait_takes_is_a_coded_refusal(value: str) -> None:
    for args in (["profile"], ["profile", "--json"], ["sample", "--count", "1"]):
        result = run_cli(*args, env={"GPU_AGENT_DISCOVERY_TIMEOUT": value})
        _refused(result, "bad_config", "GPU_AGENT_DISCOVERY_TIMEOUT")


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line: every write fails
    try:
        result = subprocess.run(
            [sys.executable, "-m", "agent.cli", "sample", "--interval", "0.01"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "GPU_AGENT_NVML_LIB": str(tmp_path / "missing" / "libnvidia-ml.so.1"),
                "GPU_AGENT_SYSFS_ROOT": str(tmp_path),
            },
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (128 + 13, "")


# ---------------------------------------------------------------------- 3. files read whole


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "huge", "deep"])
def test_config_and_policy_files_are_read_only_if_regular_small_and_flat_enough(
    conf: Path, tmp_path: Path, kind: str
) -> None:
    huge = tmp_path / "huge.toml"
    with huge.open("wb") as file:
        file.write(b"# " + b"x" * (2 << 20) + b"\n")
    deep = tmp_path / "deep.toml"  # under 1 MiB, past any parser's recursion limit
    deep.write_text("allowed_images = " + "[" * 50_000 + "]" * 50_000 + "\n")
    path = {
        "device": "/dev/zero",
        "fifo": _fifo(tmp_path),
        "directory": str(tmp_path),
        "huge": str(huge),
        "deep": str(deep),
    }[kind]
    fault = {"huge": "larger than", "deep": "nested too deeply"}.get(kind, "not a regular file")
    base = ["--coordinator", URL, "--coordinator-key", KEY]
    _refused(run_cli("run", "--config", path, *base), "bad_config", path, fault)
    _refused(run_cli(*_daemon(conf, *base, "--policy", path)), "bad_policy", path, fault)
    spec = tmp_path / "job.toml"
    spec.write_text('image = "x"\n')
    _refused(run_cli("run-local", str(spec), "--policy", path), "bad_policy", path, fault)


# ---------------------------------------------------------------------- 6. keys show


def _node_id(output: str) -> str:
    return next(line.split()[-1] for line in output.splitlines() if line.startswith("node id"))


@pytest.mark.parametrize("how", ["file", "environment", "option"])
def test_keys_show_finds_the_key_where_the_daemon_keeps_it(
    conf: Path, tmp_path: Path, how: str
) -> None:
    state = tmp_path / "somewhere" / "state"
    identity = load_or_create(state / "identity")
    args, env = ["keys", "show", "--config", str(conf)], {}
    if how == "file":
        conf.write_text(f'[paths]\nstate_dir = "{state}"')
    elif how == "environment":
        env = {"GPU_AGENT_PATHS_STATE_DIR": str(state)}
    else:
        args += ["--state-dir", str(state)]
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert _node_id(result.stdout) == identity.node_id


def test_keys_show_never_creates_a_key(conf: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = run_cli("keys", "show", "--config", str(conf), "--state-dir", str(state))
    assert result.returncode == 1
    assert "gpu-agent: error [key_missing]: " in result.stderr
    assert "first start" in result.stderr
    assert "gpu-agent keys create" in result.stderr
    assert not state.exists()
    created = run_cli("keys", "create", "--config", str(conf), "--state-dir", str(state))
    assert created.returncode == 0, created.stderr
    shown = run_cli("keys", "show", "--config", str(conf), "--state-dir", str(state))
    assert _node_id(shown.stdout) == _node_id(created.stdout)
    assert _node_id(shown.stdout) == load_or_create(state / "identity").node_id


def test_keys_show_refuses_an_empty_state_dir(conf: Path, tmp_path: Path) -> None:
    command = ["keys", "show", "--config", str(conf), "--state-dir", ""]
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", *command],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    _refused(result, "bad_config", "--state-dir=''", "paths.state_dir", "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml"]


# ---------------------------------------------------------------------- 7. exit codes


@pytest.mark.parametrize("option", ["--state-dir", "--runtime-dir"])
@pytest.mark.parametrize("where", ["/etc/passwd", "/etc/passwd/below"])
def test_a_directory_that_is_a_file_is_a_config_error(conf: Path, option: str, where: str) -> None:
    args = ["run", "--config", str(conf), "--coordinator", URL, "--coordinator-key", KEY]
    if option == "--runtime-dir":
        args += ["--state-dir", str(conf.parent / "state")]
    result = run_cli(*args, option, where)
    _refused(result, "bad_config", option, "/etc/passwd", "not a directory")


def test_a_runtime_dir_too_deep_for_the_socket_is_a_config_error(conf: Path) -> None:
    deep = "/tmp/" + "d" * 100
    args = ["--coordinator", URL, "--coordinator-key", KEY, "--runtime-dir", deep]
    result = run_cli(*_daemon(conf, *args))
    _refused(result, "bad_config", "--runtime-dir", "too long for a unix socket")
    assert not (conf.parent / "state").exists()


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "soon", "3601"])
def test_a_control_timeout_that_never_ends_is_a_usage_error(value: str) -> None:
    _refused(run_cli("status", "--timeout", value), "bad_argument", "--timeout")


@pytest.mark.parametrize("job_id", ["", "j" * 129, "\udcff"])
def test_a_job_id_the_agent_cannot_have_is_a_usage_error(job_id: str) -> None:
    # "\udcff" is how Python reads the byte 0xff of an argument that is not UTF-8.
    command = [sys.executable, "-m", "agent.cli", "logs", "--socket", "/nonexistent.sock"]
    result = subprocess.run(
        [os.fsencode(part) for part in [*command, job_id]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    _refused(result, "bad_argument", "JOB")


def test_an_empty_socket_path_is_a_usage_error() -> None:
    _refused(run_cli("status", "--socket", ""), "bad_argument", "--socket")


@pytest.mark.parametrize("user", ["0:0", "0:1000", "1000:0", "4294967295:1000"])
def test_jobs_never_run_as_root(conf: Path, user: str) -> None:
    conf.write_text(f'[jobs]\nuser = "{user}"')
    with pytest.raises(ConfigError, match=r"jobs\.user"):
        _load(conf)
    conf.write_text("")
    with pytest.raises(ConfigError, match="GPU_AGENT_JOBS_USER"):
        _load(conf, env={"GPU_AGENT_JOBS_USER": user})


@pytest.mark.parametrize(
    ("var", "hint"),
    [
        ("GPU_AGENT_TELEMTRY_INTERVAL_S", "GPU_AGENT_TELEMETRY_INTERVAL_S"),
        ("GPU_AGENT_STATE_DIR", "GPU_AGENT_PATHS_STATE_DIR"),
        ("GPU_AGENT_NVML_LIBRARY", "GPU_AGENT_NVML_LIB"),
        ("GPU_AGENT_X", ""),
    ],
)
def test_a_misspelt_variable_is_refused_by_name(
    conf: Path, var: str, hint: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=re.escape(var)) as caught:
        _load(conf, env={var: "1"})
    assert hint in caught.value.detail
    result = run_cli(*_daemon(conf, "--coordinator", URL, "--coordinator-key", KEY), env={var: "1"})
    _refused(result, "bad_config", var)


def test_every_gpu_agent_variable_the_code_reads_is_still_accepted(conf: Path) -> None:
    config_vars = {
        env_var(section.name, key.name)
        for section in msgspec.structs.fields(AgentConfig)
        for key in msgspec.structs.fields(section.type)
    }
    found: set[str] = set()
    for top in (
        "hal",
        "sandbox",
        "keyfile",
        "agent",
        "coordinator",
        "scripts",
        "packaging",
        "tests",
    ):
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".sh", ".yaml", ".toml", ".service"):
                found |= set(re.findall(r"\bGPU_AGENT_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    found |= set(re.findall(r"\bGPU_AGENT_[A-Z0-9_]*[A-Z0-9]\b", (ROOT / "README.md").read_text()))
    outside = found - config_vars
    misspelt_on_purpose = {
        "GPU_AGENT_TELEMETRY_INTERVAL",  # tests/unit/test_config.py: an unknown key
        "GPU_AGENT_TELEMTRY_INTERVAL_S",
        "GPU_AGENT_STATE_DIR",
        "GPU_AGENT_NVML_LIBRARY",
        "GPU_AGENT_X",
    }
    assert outside - misspelt_on_purpose == NOT_CONFIG_VARIABLES
    _load(conf, env=dict.fromkeys(NOT_CONFIG_VARIABLES, "x"))


# ------------------------------------------------------------ 2. the tray without a display


def test_the_tray_without_a_display_is_a_coded_refusal_not_an_abort() -> None:
    pytest.importorskip("PySide6")
    env = {k: v for k, v in os.environ.items() if k not in _DISPLAY_VARIABLES}
    tray = Path(sys.executable).parent / "gpu-agent-tray"
    result = subprocess.run(
        [str(tray)], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("gpu-agent-tray: error [no_display]: ")
    assert "Traceback" not in result.stderr


_DISPLAY_VARIABLES = ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")


def test_the_tray_refuses_an_empty_socket_path() -> None:
    from agent.tray.main import main

    with pytest.raises(SystemExit) as exited:
        main(["--socket", ""])
    assert exited.value.code == 2


@pytest.mark.parametrize(
    ("env", "shown"),
    [
        ({}, False),
        ({"DISPLAY": ":0"}, True),
        ({"WAYLAND_DISPLAY": "wayland-0"}, True),
        ({"QT_QPA_PLATFORM": "xcb"}, False),
        ({"QT_QPA_PLATFORM": "xcb", "WAYLAND_DISPLAY": "wayland-0"}, False),
        ({"QT_QPA_PLATFORM": "wayland;xcb", "DISPLAY": ":1"}, True),
        ({"QT_QPA_PLATFORM": "wayland-egl", "WAYLAND_DISPLAY": "wayland-0"}, True),
        ({"QT_QPA_PLATFORM": "offscreen"}, True),
        ({"QT_QPA_PLATFORM": "vnc:size=800x600"}, True),
    ],
)
def test_the_tray_knows_which_platforms_need_a_display(env: dict[str, str], shown: bool) -> None:
    assert (display_problem(env, "linux") == "") is shown
    assert display_problem(env, "darwin") == ""
