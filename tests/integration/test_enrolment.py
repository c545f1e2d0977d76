"""Enrolment by token: ``coordinator.enrolment_token_file`` (the file, the environment or
``gpu-agent run --enrolment-token-file``), presented by the real daemon to the reference
coordinator in ``token`` admission mode (in this process, on 127.0.0.1:0); and the token
kept out of ``ps``, the agent's log and ``gpu-agent status``.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest
from support.cli import run_cli
from support.paths import XML

from agent.config.settings import AgentConfig, Flag, load_config
from agent.daemon.main import daemon_config
from agent.errors import ConfigError
from agent.protocol import crypto
from coordinator.server import Coordinator, Settings

# A fresh token each run: finding it anywhere it should not be is no accident.
TOKEN = "enrol-" + secrets.token_hex(16)
KEY = crypto.b64encode(bytes(range(32)))
URL = "ws://127.0.0.1:1/agent"
VARIABLE = "GPU_AGENT_COORDINATOR_ENROLMENT_TOKEN_FILE"
KEY_NAME = "coordinator.enrolment_token_file"


def _token_file(directory: Path, content: str | bytes = TOKEN + "\n", mode: int = 0o600) -> Path:
    path = directory / "enrolment-token"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return path


def _load(
    conf: Path, *flags: Flag, env: dict[str, str] | None = None, run: bool = True
) -> AgentConfig:
    """The configuration as ``gpu-agent run`` (``run``) or ``gpu-agent keys`` loads it."""
    env = {"GPU_AGENT_COORDINATOR_URL": URL, "GPU_AGENT_COORDINATOR_KEYS": KEY, **(env or {})}
    return load_config(conf, env, system=True, require_coordinator=run, flags=flags)


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text("")
    return path


# ------------------------------------------------------------------ the key and its checks


def test_the_file_the_variable_and_the_option_name_the_token_file(conf: Path) -> None:
    path = _token_file(conf.parent, f"  {TOKEN} \r\n\n")
    from_option = _load(conf, Flag("--enrolment-token-file", KEY_NAME, str(path)))
    from_variable = _load(conf, env={VARIABLE: str(path)})
    conf.write_text(f'[coordinator]\nenrolment_token_file = "{path}"\n')
    for config in (from_option, from_variable, _load(conf)):
        assert config.coordinator.enrolment_token_file == path
        # Surrounding whitespace (a final newline, CRLF) is not part of the token.
        assert daemon_config(config).link.enrolment_token == TOKEN


def test_without_a_token_file_no_token_is_sent(conf: Path) -> None:
    config = _load(conf)
    assert config.coordinator.enrolment_token_file is None
    assert daemon_config(config).link.enrolment_token is None
    # An empty variable unsets the file's key, as for every key whose default is none.
    conf.write_text(f'[coordinator]\nenrolment_token_file = "{conf.parent / "gone"}"\n')
    config = _load(conf, env={VARIABLE: ""})
    assert daemon_config(config).link.enrolment_token is None


@pytest.mark.parametrize("option", ["--enrolment-token-file", "--ca-file", "--state-dir"])
def test_an_empty_path_option_is_refused_not_taken_as_unset(conf: Path, option: str) -> None:
    # `--enrolment-token-file "$UNSET"` would otherwise run without the token, silently.
    done = run_cli(
        "run", "--config", str(conf), "--coordinator", URL, "--coordinator-key", KEY, option, ""
    )
    assert done.returncode == 2
    assert f"error [bad_config]: {option}='': " in done.stderr
    assert "an empty path" in done.stderr


def test_the_daemons_configuration_never_shows_the_token(conf: Path) -> None:
    path = _token_file(conf.parent)
    daemon = daemon_config(_load(conf, env={VARIABLE: str(path)}))
    assert daemon.link.enrolment_token == TOKEN
    assert TOKEN not in repr(daemon)
    assert TOKEN not in repr(daemon.link)
    assert "enrolment_token='<hidden>'" in repr(daemon.link)


def test_a_token_file_changed_for_the_worse_after_the_check_still_stops_the_start(
    conf: Path,
) -> None:
    path = _token_file(conf.parent)
    config = _load(conf, env={VARIABLE: str(path)})
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="mode 0644") as caught:
        daemon_config(config)
    assert caught.value.code == "bad_config"


@pytest.mark.parametrize(
    ("text", "env", "fragment"),
    [
        ("", {VARIABLE: "token"}, "absolute"),
        ('[coordinator]\nenrolment_token_file = "token"', {}, "absolute"),
        ('[coordinator]\nenrolment_token_file = "/tmp/a\\u0000b"', {}, "NUL"),
        ("[coordinator]\nenrolment_token_file = 1", {}, "Expected `Path`, got `int`"),
    ],
)
def test_a_path_that_can_never_work_is_refused_from_the_file_and_the_environment(
    conf: Path, text: str, env: dict[str, str], fragment: str
) -> None:
    conf.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(fragment)) as caught:
        _load(conf, env=env)
    assert caught.value.code == "bad_config"
    assert KEY_NAME in caught.value.detail


def test_keys_show_does_not_read_the_token_file(conf: Path) -> None:
    # The file is the service user's alone; an operator's `gpu-agent keys show` must not
    # need it, nor fail on it.
    path = _token_file(conf.parent, mode=0o644)
    config = _load(conf, env={VARIABLE: str(path)}, run=False)
    assert config.coordinator.enrolment_token_file == path
    with pytest.raises(ConfigError, match="mode 0644"):
        _load(conf, env={VARIABLE: str(path)})


# ------------------------------------------------------------------ refused at start, exit 2


def _fifo(directory: Path) -> Path:
    path = directory / "fifo"
    os.mkfifo(path, 0o600)
    return path


def _directory(directory: Path) -> Path:
    path = directory / "tokens.d"
    path.mkdir(mode=0o700)
    return path


BAD_TOKENS: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    # name: (make the file, what the refusal says, content that must not be echoed)
    "open to others": (lambda d: _token_file(d, mode=0o644), "mode 0644", TOKEN),
    "open to the group": (lambda d: _token_file(d, mode=0o640), "mode 0640", TOKEN),
    "a directory": (_directory, "not a regular file", ""),
    "/dev/zero": (lambda d: Path("/dev/zero"), "not a regular file", ""),
    "a FIFO": (_fifo, "not a regular file", ""),
    "missing": (lambda d: d / "missing", "no such file", ""),
    "empty": (lambda d: _token_file(d, " \n"), "1 to 256 characters, not 0", ""),
    "too long": (lambda d: _token_file(d, "x" * 257), "not 257", "x" * 257),
    "two tokens": (lambda d: _token_file(d, f"{TOKEN}\n{TOKEN}2\n"), "one token", TOKEN),
    "a control character": (lambda d: _token_file(d, "ctl-secret\x1b[2J"), "printable", "secret"),
    "not UTF-8": (lambda d: _token_file(d, b"\xfftoken-of-latin-1"), "not UTF-8", "latin"),
    "too large": (lambda d: _token_file(d, "y" * 5000), "larger than 4096 bytes", "yyyy"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_run_refuses_a_bad_token_file_at_start_without_showing_it(conf: Path, case: str) -> None:
    make, fragment, secret = BAD_TOKENS[case]
    path = make(conf.parent)
    state = conf.parent / "state"
    done = run_cli(
        "run", "--config", str(conf), "--state-dir", str(state),
        "--coordinator", URL, "--coordinator-key", KEY,
        "--enrolment-token-file", str(path),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"gpu-agent: error [bad_config]: --enrolment-token-file='{path}': ")
    assert KEY_NAME in line
    assert fragment in line
    if secret:
        assert secret not in line
    assert done.stdout == ""
    assert not state.exists()  # nothing was made


def test_the_variable_is_refused_alike_at_start(conf: Path) -> None:
    path = _token_file(conf.parent, mode=0o604)
    done = run_cli(
        "run", "--config", str(conf), "--coordinator", URL, "--coordinator-key", KEY,
        env={VARIABLE: str(path)},
    )  # fmt: skip
    assert done.returncode == 2
    assert f"error [bad_config]: {VARIABLE}='{path}': {KEY_NAME}: " in done.stderr
    assert "mode 0604" in done.stderr
    assert TOKEN not in done.stderr


# ------------------------------------------------------------------ the daemon and the coordinator


class Agent:
    """``gpu-agent run`` as a child process, on the fake NVML, logging to a file."""

    def __init__(self, workdir: Path, library: Path, coordinator: Coordinator) -> None:
        self.workdir = workdir
        self.library = library
        self.coordinator = coordinator
        self.log = workdir / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable, "-m", "agent.cli", "run",
            "--coordinator", f"ws://127.0.0.1:{self.coordinator.port}/agent",
            "--coordinator-key", self.coordinator.key.public_key_b64,
            "--state-dir", str(self.workdir / "agent"),
            "--runtime-dir", str(self.workdir / "run"),
            "--interval", "0.2", *extra,
        ]  # fmt: skip
        env = {
            **os.environ,
            "GPU_AGENT_NVML_LIB": str(self.library),
            "FAKENVML_CONTROL": str(self.workdir / "nvml-control"),
        }
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        return self.process

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait for ``condition``; fail, with the log, if the agent exits meanwhile."""
        assert self.process is not None
        deadline = time.monotonic() + 60
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the agent exited {self.process.returncode} waiting for {what}:\n"
                            f"{self.log.read_text()}")  # fmt: skip
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}:\n{self.log.read_text()}")
            await asyncio.sleep(0.05)

    async def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        # In a thread: the coordinator shares this loop and must go on serving meanwhile.
        return await asyncio.to_thread(self.process.wait, 60)

    def status(self) -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", "status", "--json",
             "--socket", str(self.workdir / "run" / "agent.sock")],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert TOKEN not in done.stdout
        status: dict[str, object] = msgspec.json.decode(done.stdout)
        return status

    def refusals(self) -> int:
        return self.log.read_text().count("enrolment_required")

    def node_id(self) -> str:
        return (self.workdir / "agent" / "identity" / "node_id").read_text().strip()


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    server = Coordinator(
        db_path=tmp_path / "coordinator.db",
        state_dir=tmp_path / "coordinator",
        settings=Settings(admission="token", enrolment_tokens=frozenset({TOKEN})),
    )
    async with server:
        yield server


async def test_a_new_node_is_refused_without_its_token_and_enrolled_with_it(
    tmp_path: Path,
    coordinator: Coordinator,
    library_for: Callable[[Path], Path],
    docker_engine: str,
) -> None:
    agent = Agent(tmp_path, library_for(XML / "dual_a5000-v13.xml"), coordinator)

    # Without a token: refused, and the daemon goes on trying (with its backoff).
    agent.start()
    await agent.until(lambda: agent.refusals() >= 2, "two refusals")
    node_id = agent.node_id()
    assert coordinator.store.nodes.get(node_id) is None
    assert agent.status()["connection"] == "connecting"
    assert await agent.stop() == 0

    # With its token file: admitted, its profile stored.
    path = _token_file(tmp_path)
    process = agent.start("--enrolment-token-file", str(path))
    await agent.until(lambda: node_id in coordinator.connected(), "the node to be admitted")
    await agent.until(
        lambda: coordinator.store.nodes.latest_profile(node_id) is not None, "the node's profile"
    )
    status = agent.status()
    assert (status["node_id"], status["connection"]) == (node_id, "connected")
    # Never in `ps` (the command line, the environment): the file is named, not the token.
    for name in ("cmdline", "environ"):
        assert TOKEN.encode() not in Path(f"/proc/{process.pid}/{name}").read_bytes()
    assert await agent.stop() == 0

    # Enrolled, the node needs the token no more.
    path.unlink()
    agent.start()
    await agent.until(lambda: node_id in coordinator.connected(), "the known node to connect")
    assert await agent.stop() == 0

    log = agent.log.read_text()
    assert "connected to" in log  # the log is the daemon's, and it says what happened
    assert TOKEN not in log
    # Nor in anything either side keeps: the outbox (telemetry, profiles) and the store.
    kept = [*(tmp_path / "agent").rglob("*"), *tmp_path.glob("coordinator.db*")]
    assert any(p.name == "outbox.db" for p in kept)
    for path in kept:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
