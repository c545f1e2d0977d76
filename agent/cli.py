"""The ``gpu-agent`` command line."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from agent.errors import AgentError, ConfigError
from hal import __version__
from hal.errors import BadConfig, HalError

if TYPE_CHECKING:
    import argparse

    from agent.config.settings import AgentConfig
    from hal.backend import HalConfig
    from hal.profile import PendingProfile
    from hal.types import Profile

__all__ = ["main"]

EXIT_USAGE = 2
#: A reader of our output went away (``gpu-agent status | head -1``): the status of a
#: command that SIGPIPE ended, as a shell reports it, without a traceback.
EXIT_BROKEN_PIPE = 128 + 13


#: The longest ``sample --interval``: a day (time.sleep takes no infinity).
MAX_SAMPLE_INTERVAL_S = 86400.0


def _interval(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    if not value <= MAX_SAMPLE_INTERVAL_S:  # also refuses inf
        raise argparse.ArgumentTypeError(
            f"{text!r} must be at most {MAX_SAMPLE_INTERVAL_S:g} seconds"
        )
    return value


def _count(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 (forever) or more")
    return value


def _parser() -> argparse.ArgumentParser:
    # argparse is imported only now: `gpu-agent profile` starts its discovery first.
    import argparse

    class _Parser(argparse.ArgumentParser):
        """argparse, with errors that carry a stable code."""

        def error(self, message: str) -> NoReturn:
            self.print_usage(sys.stderr)
            self.exit(EXIT_USAGE, f"{self.prog}: error [bad_argument]: {message}\n")

    parser = _Parser(prog="gpu-agent", description="Lend this machine's GPUs to a compute network.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    profile = commands.add_parser("profile", help="show this machine's GPUs and host")
    profile.add_argument("--json", action="store_true", help="print the whole profile as JSON")

    sample = commands.add_parser("sample", help="print telemetry samples as JSON lines")
    sample.add_argument("--interval", type=_interval, default=1.0, metavar="S")
    sample.add_argument("--count", type=_count, default=0, metavar="N", help="0: until Ctrl-C")

    doctor = commands.add_parser("doctor", help="check what stands between you and serving jobs")
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")

    run = commands.add_parser(
        "run-local",
        help="run a workload spec file here, through the admission policy and the sandbox",
        description="Run a workload spec (TOML or JSON) on this machine exactly as a "
        "coordinator's job would run. Exit status: 0 completed, 1 failed, 3 refused.",
    )
    run.add_argument("spec", type=Path, metavar="SPEC_FILE")
    run.add_argument(
        "--policy",
        type=Path,
        metavar="POLICY_FILE",
        help="operator policy (TOML); default: any image by name, default limits",
    )
    run.add_argument("--json", action="store_true", help="print events and result as JSON lines")
    run.add_argument(
        "--registry-logins",
        type=Path,
        metavar="FILE",
        help="TOML file of registry logins (mode 600), to resolve and pull a tag",
    )
    run.add_argument(
        "--registry-ca", type=Path, metavar="FILE", help="PEM CA bundle the registries chain to"
    )

    daemon = commands.add_parser(
        "run", help="connect to a coordinator: attest this machine and stream its telemetry"
    )
    _add_config_options(daemon)
    daemon.add_argument(
        "--coordinator", metavar="URL", help="ws(s)://host:port/agent (coordinator.url)"
    )
    daemon.add_argument(
        "--coordinator-key",
        action="append",
        metavar="BASE64",
        help="the coordinator's public key to pin (`gpu-coordinator key` prints it)",
    )
    daemon.add_argument(
        "--ca-file", metavar="FILE", help="CA bundle (PEM) for a wss:// coordinator"
    )
    daemon.add_argument(
        "--enrolment-token-file",
        metavar="FILE",
        help="a file (mode 0600) with the token a coordinator asks of a new node "
        "(coordinator.enrolment_token_file); never the token itself: arguments are public",
    )
    daemon.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="allow ws:// to a coordinator that is not on this machine (acks can be forged)",
    )
    daemon.add_argument(
        "--policy",
        type=Path,
        metavar="POLICY_FILE",
        help="admission policy (TOML); without one no image is allowed",
    )
    daemon.add_argument(
        "--runtime-dir", metavar="DIR", help="paths.runtime_dir (the control socket is there)"
    )
    daemon.add_argument("--interval", metavar="S", help="telemetry.interval_s")
    daemon.add_argument("--batch", metavar="N", help="telemetry.batch: samples a batch")

    keys = commands.add_parser("keys", help="this node's identity")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    for name, text in (
        ("show", "print the node id and public key of the agent's key (never creates one)"),
        ("create", "create the agent's key if there is none yet, and print it"),
    ):
        _add_config_options(keys_commands.add_parser(name, help=text))

    from agent.control.args import add_commands

    add_commands(commands, _Parser)
    return parser


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--state-dir``: the commands that read the agent's configuration
    read it the same way (``keys show`` finds the key ``run`` uses)."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the agent's TOML configuration (docs/configuration.md); default: "
        "/etc/gpu-agent/agent.toml for a system install, else the user config dir. "
        "The options below override it",
    )
    parser.add_argument("--state-dir", metavar="DIR", help="paths.state_dir")


# Commands import what they need when they run: `gpu-agent profile` is timed against a bare
# `python -c "import psutil"`, and every module imported before discovery starts counts.
# Each command is a function of the configuration and the parsed arguments.


def _profile(config: HalConfig, args: argparse.Namespace) -> int:
    from hal.profile import take_profile

    return _show_profile(take_profile(config), args.json)


def _show_profile(profile: Profile, as_json: bool) -> int:
    import msgspec

    if as_json:
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(profile)) + b"\n")
    else:
        from agent.render import render_profile

        print(render_profile(profile))
    return 0


def _sample(config: HalConfig, args: argparse.Namespace) -> int:
    import time

    import msgspec

    from hal.host import host_sample
    from hal.machine import Hal
    from hal.types import Sample

    interval: float = args.interval
    count: int = args.count
    hal = Hal(config)
    hal.open()
    encoder = msgspec.json.Encoder()
    out = sys.stdout.buffer
    host_sample()  # primes psutil's CPU counters so that the first share is real
    next_tick = time.monotonic()
    taken = 0
    try:
        while count == 0 or taken < count:
            if taken:
                next_tick += interval
                time.sleep(max(0.0, next_tick - time.monotonic()))
            sample = Sample(taken_at=time.time(), host=host_sample(), gpus=hal.sample())
            out.write(encoder.encode(sample) + b"\n")
            out.flush()
            taken += 1
    except KeyboardInterrupt:
        pass
    finally:
        hal.close()
    return 0


def _doctor(config: HalConfig, args: argparse.Namespace) -> int:
    import msgspec

    from agent.doctor import diagnose, gather
    from agent.render import render_findings

    findings = diagnose(gather(config))
    if args.json:
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(findings)) + b"\n")
    else:
        print(render_findings(findings))
    return 1 if any(f.severity == "blocker" for f in findings) else 0


def _run_local(config: HalConfig, args: argparse.Namespace) -> int:
    from agent.jobs.run_local import Registries, default_jobs_dir, load_policy, run_local
    from oci import OciError, read_logins
    from sandbox.errors import SandboxError
    from sandbox.runner import RunnerConfig
    from sandbox.spec import load_spec_file

    try:
        spec = load_spec_file(args.spec)
        policy = load_policy(args.policy)
        logins = read_logins(args.registry_logins) if args.registry_logins else {}
        ca_file = args.registry_ca
        if ca_file is not None and not ca_file.is_file():
            raise OciError("bad_setting", f"--registry-ca {ca_file}: not a file")
    except (SandboxError, OciError) as exc:
        print(f"gpu-agent: error [{exc.code}]: {exc.detail}", file=sys.stderr)
        return EXIT_USAGE
    return run_local(
        spec,
        policy,
        hal_config=config,
        runner_config=RunnerConfig(
            jobs_dir=default_jobs_dir(),
            runtime=policy.runtime,
            max_image_unpacked_bytes=policy.max_image_unpacked_bytes,
        ),
        docker_socket=str(config.docker_socket),
        as_json=args.json,
        registries=Registries(logins, ca_file),
    )


def _run_daemon(config: HalConfig, args: argparse.Namespace) -> int:
    import logging

    from agent.daemon.main import daemon_config, run_daemon

    agent_config = _agent_config(args, require_coordinator=True)
    if args.coordinator is not None and not args.coordinator_key:
        # The file's keys are for the file's coordinator, not for another one.
        raise ConfigError("bad_config", "--coordinator needs --coordinator-key")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_daemon(daemon_config(agent_config), config)


def _agent_config(args: argparse.Namespace, *, require_coordinator: bool = False) -> AgentConfig:
    """The configuration ``gpu-agent run`` would run with: the file, the environment and
    this command line's options, checked together."""
    from agent.config.overrides import command_line_flags
    from agent.config.settings import is_system_install, load_config

    return load_config(
        args.config,
        os.environ,
        system=is_system_install(),
        require_coordinator=require_coordinator,
        flags=command_line_flags(args),
    )


def _keys(config: HalConfig, args: argparse.Namespace) -> int:
    from agent.link.identity import IDENTITY_DIR, load_existing, load_or_create, show

    identity_dir = _agent_config(args).paths.state_dir / IDENTITY_DIR
    if args.keys_command == "create":
        identity = load_or_create(identity_dir)
    else:
        identity = load_existing(identity_dir)
    print(show(identity))
    return 0


# A new subcommand: its arguments in _parser(), its function here, and its name in
# _ONE_SHOT if it ends on its own.
_COMMANDS: dict[str, Callable[[HalConfig, argparse.Namespace], int]] = {
    "profile": _profile,
    "sample": _sample,
    "doctor": _doctor,
    "run-local": _run_local,
    "run": _run_daemon,
    "keys": _keys,
}

# Commands that start, report and end. Their start-up allocates many objects that live to
# the end, so the cyclic garbage collector stays off while they run: its passes would only
# walk (and, in a discovery child forked meanwhile, copy) pages of live objects. When they
# are done, what they left is frozen before the collector is back on, so that neither its
# next pass nor the interpreter's collections at exit walk it all once more. Commands that
# run on get the collector back before they start.
_ONE_SHOT = frozenset({"profile", "doctor", "keys"})


# The `profile` command lines that need no parser, each with its `--json`: argparse and
# the shutil, gettext and locale it imports take about 5 ms, a tenth of the command.
# tests/integration/test_cli.py checks that argparse reads them the same.
_PLAIN_PROFILE = {("profile",): False, ("profile", "--json"): True}


def _start_early(argv: Sequence[str]) -> PendingProfile | None:
    """Start what `gpu-agent profile` waits for (Docker, GPU discovery) before parsing.

    The engine gets its question before msgspec is imported, and the discovery children
    fork before argparse is: they work while this process goes on alone. The caller stops
    them when the command line turns out not to run `profile` (a usage error, ``--help``).
    """
    if list(argv[:1]) != ["profile"]:
        return None
    from hal.runtime import RuntimeProbe, docker_socket

    runtime = RuntimeProbe(docker_socket(os.environ))
    try:
        from hal.backend import HalConfig
        from hal.profile import PendingProfile

        return PendingProfile(HalConfig.from_env(), runtime)
    except BadConfig:
        runtime.close()
        return None  # reported after parsing, as for every command
    except BaseException:
        runtime.close()
        raise


def _drop_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for the reader that left must
    not fail again when the interpreter flushes it at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    collecting = gc.isenabled()
    gc.disable()
    one_shot = False
    early = None
    try:
        early = _start_early(argv)
        if early is not None and tuple(argv) in _PLAIN_PROFILE:
            one_shot = True
            status = _show_profile(early.result(), _PLAIN_PROFILE[tuple(argv)])
        else:
            args = _parser().parse_args(argv)
            one_shot = args.command in _ONE_SHOT
            if collecting and not one_shot:
                gc.enable()
            status = _dispatch(args, early)
        sys.stdout.flush()  # here, where a reader that went away is caught
        return status
    except (HalError, AgentError) as exc:
        print(f"gpu-agent: error [{exc.code}]: {exc.detail}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, BadConfig | ConfigError) else 1
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    finally:
        if early is not None:
            early.close()
        if collecting and not gc.isenabled():
            if one_shot:
                gc.freeze()
            gc.enable()


def _dispatch(args: argparse.Namespace, early: PendingProfile | None) -> int:
    from agent.control.args import COMMANDS

    if args.command in COMMANDS:
        # The control commands talk to the daemon only: no HAL settings to read.
        from agent.control.cli import run_command

        status = run_command(args)
        assert status is not None
        return status
    from hal.backend import HalConfig

    config = HalConfig.from_env()
    if early is not None and args.command == "profile":
        return _show_profile(early.result(), args.json)
    return _COMMANDS[args.command](config, args)


if __name__ == "__main__":
    sys.exit(main())
