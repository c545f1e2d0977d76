"""``gpu-coordinator``: run the reference coordinator, print its key for agents to pin,
submit, cancel and list jobs, and deploy services, through the admin API of a running one."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import platformdirs

from agent.protocol.memory import reuse_freed_memory
from agent.protocol.signals import stop_on_signals
from coordinator import admission, cli_args, cli_deploy, cli_keys, keys
from coordinator.admin import check_url
from coordinator.client import AdminClient, load_spec_file
from coordinator.collector import keep_frozen
from coordinator.db import describe, driver_errors, redact
from coordinator.errors import (
    AdminError,
    ConfigError,
    CoordinatorError,
    GatewayError,
    JobError,
    KeyFileError,
)
from coordinator.images import ImagePinner
from coordinator.outputs_download import download_outputs
from coordinator.server import Coordinator, serve
from oci import Credentials

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_ERROR",
    "EXIT_USAGE",
    "default_state_dir",
    "main",
]

EXIT_ERROR = 1
EXIT_USAGE = 2
#: As a shell reports a command killed by SIGPIPE: the reader went away (``| head``).
EXIT_BROKEN_PIPE = 128 + 13
_APP_NAME = "gpu-coordinator"


def default_state_dir() -> Path:
    """The key's and admin file's folder by default: the user's data dir (as the agent's)."""
    return Path(platformdirs.user_data_dir(_APP_NAME, appauthor=False))


class _Parser(argparse.ArgumentParser):
    """argparse, with errors that carry a stable code."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error [bad_argument]: {message}\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0..65535")
    return port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _nonempty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("an empty path (it would mean the current directory)")
    return text


def _path(text: str) -> Path:
    # Path("") is ".": an empty option (an unset variable in a script) would put the key
    # in whatever directory the command ran in.
    if not text:
        raise argparse.ArgumentTypeError("an empty path (it would mean the current directory)")
    return Path(text)


def _state_dir_option(parser: argparse.ArgumentParser, what: str) -> None:
    default = default_state_dir()
    parser.add_argument(
        "--state-dir", type=_path, default=default, help=f"{what} (default: {default})"
    )


def _admin_options(parser: argparse.ArgumentParser) -> None:
    _state_dir_option(parser, "the coordinator's, with its admin.json")
    parser.add_argument("--url", help="admin API URL (default: the one in admin.json)")


def _parser() -> _Parser:
    parser = _Parser(prog="gpu-coordinator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("serve", help="accept agents; serve the read API and dashboard")
    run.add_argument("--host", default="127.0.0.1", help="address to listen on")
    run.add_argument("--port", type=_port, default=8765, help="TCP port (0: any free one)")
    run.add_argument(
        "--db",
        type=_nonempty,
        required=True,
        help="the store: a SQLite file, or a postgresql://user@host/db URL (several"
        " coordinators may share one)",
    )
    _state_dir_option(run, "signing key and admin.json, made at the first start")
    run.add_argument("--tls-cert", type=_path, help="PEM certificate chain (TLS on)")
    run.add_argument("--tls-key", type=_path, help="PEM private key of --tls-cert")
    run.add_argument(
        "--admin-port", type=_port, default=0, help="admin API port on 127.0.0.1 (0: any free)"
    )
    run.add_argument(
        "--artifacts-port",
        type=_port,
        help="port on --host where nodes PUT job outputs (default: --port + 1, so 8766;"
        " 0: any free, which breaks the upload URLs of offers sent before a restart)",
    )
    run.add_argument(
        "--artifacts-url",
        help="http(s)://host[:port] of the artifact listener as nodes reach it (default: --host"
        " and --artifacts-port): the host nodes name this coordinator by, as they upload"
        " only there by default",
    )
    run.add_argument(
        "--gateway-port",
        type=_port,
        help="port on --host of the OpenAI-compatible gateway (default: --port + 2, so 8767;"
        " 0: any free one, as with --port 0)",
    )
    run.add_argument(
        "--peer-url",
        help="http(s)://host[:port] of the gateway as the other coordinators on the same"
        " --db reach it: they send it the requests for the services of the nodes whose"
        " tunnel is here (default: none; only with PostgreSQL)",
    )
    run.add_argument(
        "--registry-logins",
        type=_path,
        help="TOML file of registry logins, to pin submitted tags to digests (mode 600)",
    )
    run.add_argument("--registry-ca", type=_path, help="PEM CA bundle the registries chain to")
    admission.add_options(run)
    cli_deploy.add_serve_options(run, _seconds)
    key = commands.add_parser("key", help="print the key id and public key for agents to pin")
    _state_dir_option(key, "signing key")
    key.add_argument(
        "--create", action="store_true", help="make the key if there is none (serve does too)"
    )
    submit = commands.add_parser("submit", help="sign and send a job to a node; print its id")
    submit.add_argument("spec_file", type=_path, metavar="SPEC_FILE", help=".toml or .json spec")
    submit.add_argument("--node", required=True, help="the node id to run it")
    submit.add_argument("--job-id", help="the job id (default: job-<random hex>)")
    submit.add_argument("--ttl", type=_seconds, help="seconds the offer stays valid (1 hour)")
    submit.add_argument(
        "--wait", action="store_true", help="wait until it ends; exit 0 only if completed"
    )
    submit.add_argument("--timeout", type=_seconds, help="with --wait: give up after this")
    submit.add_argument(
        "--upload",
        action="append",
        default=[],
        metavar="PATH=URL",
        help="PUT output PATH to URL (a presigned URL); others go to the coordinator",
    )
    submit.add_argument(
        "--out", type=Path, metavar="DIR", help="with --wait: fetch the outputs here, checked"
    )
    submit.add_argument(
        "--registry-logins",
        type=_path,
        metavar="FILE",
        help="TOML file of a short-lived login to the image's registry, sent in the signed"
        " offer for the node's pull (mode 600)",
    )
    _admin_options(submit)
    prefetch = commands.add_parser(
        "prefetch", help="ask a node to pull an image now (a tag is pinned first)"
    )
    prefetch.add_argument("image", metavar="IMAGE", help="name@sha256:<digest>, or name:tag")
    prefetch.add_argument("--node", required=True, help="the node id to pull it")
    _admin_options(prefetch)
    cancel = commands.add_parser("cancel", help="ask a job's node to stop it")
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.add_argument("--reason", default="", help="told to the node")
    _admin_options(cancel)
    jobs = commands.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--json", action="store_true", help="the API's JSON instead of a table")
    _admin_options(jobs)
    cli_deploy.add_commands(commands, _admin_options, _path)
    admin = argparse.ArgumentParser(add_help=False)
    _admin_options(admin)
    cli_keys.add_parser(commands, [admin])
    return parser


def _ready(coordinator: Coordinator) -> None:
    print(f"listening on {coordinator.url}", flush=True)
    print(f"dashboard at {coordinator.dashboard_url}", flush=True)
    print(f"key id {coordinator.key.key_id}", flush=True)
    print(f"admin API at {coordinator.admin_url} (token in {coordinator.admin_file})", flush=True)
    # After the lines before it: scripts read them by their order.
    print(f"gateway at {coordinator.gateway_url}", flush=True)


async def _serve(
    args: argparse.Namespace,
    ssl_context: ssl.SSLContext | None,
    settings: admission.Settings,
    pinner: ImagePinner,
) -> None:
    stop = asyncio.Event()
    restore = stop_on_signals(stop)
    # Long-lived objects (sessions) frozen out of the collector's full passes: the process's
    # own policy, not the library's (a test process that embeds a coordinator keeps its own).
    frozen = asyncio.create_task(keep_frozen())
    try:
        await serve(
            args.host,
            args.port,
            args.db,
            args.state_dir,
            stop=stop,
            on_ready=_ready,
            ssl_context=ssl_context,
            admin_port=args.admin_port,
            artifacts_port=args.artifacts_port,
            artifacts_url=args.artifacts_url,
            gateway_port=args.gateway_port,
            peer_url=args.peer_url or "",
            settings=settings,
            pinner=pinner,
            deploy_grace_s=args.deploy_grace,
        )
    finally:
        frozen.cancel()
        await asyncio.gather(frozen, return_exceptions=True)
        restore()


def _submit(args: argparse.Namespace, client: AdminClient, submission: _Submission) -> int:
    uploads = cli_args.parse_uploads(args.upload)
    job_id = client.submit(
        args.node,
        submission.spec,
        job_id=args.job_id,
        ttl_s=args.ttl,
        uploads=uploads,
        registry_logins=submission.logins,
    )
    print(job_id, flush=True)
    if not args.wait:
        return 0
    job = client.wait(job_id, timeout_s=args.timeout)
    print(_outcome(job))
    if args.out is not None:
        for path in download_outputs(client, job, args.out):
            print(f"{args.out / path}")
    return 0 if job.get("state") == "completed" else EXIT_ERROR


def _outcome(job: dict[str, Any]) -> str:
    """``STATE [code=CODE] receipt=DIGEST|- [chain=ok|broken] [problems=a,b]``."""
    words = [str(job.get("state"))]
    if job.get("code"):
        words.append(f"code={job['code']}")
    result = job.get("result")
    if isinstance(result, dict):
        words.append(f"receipt={result.get('receipt_sha256')}")
        words.append("chain=" + ("ok" if result.get("chain_ok") else "broken"))
        if result.get("problems"):
            words.append("problems=" + ",".join(map(str, result["problems"])))
    else:
        words.append("receipt=-")
    return " ".join(words)


def _jobs(args: argparse.Namespace, client: AdminClient) -> int:
    jobs = client.jobs()
    if args.json:
        print(json.dumps({"jobs": jobs}, indent=2))
        return 0
    print(f"{'JOB':<24} {'NODE':<32} {'STATE':<12} UPDATED")
    for job in jobs:
        print(f"{job['job_id']:<24} {job['node_id']:<32} {job['state']:<12} {_when(job)}")
    return 0


def _when(job: dict[str, Any]) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["updated"]))
    except (OverflowError, OSError, ValueError):  # a time no calendar holds
        return str(job["updated"])


def _fail(exc: CoordinatorError, status: int) -> int:
    print(f"gpu-coordinator: error [{exc.code}]: {exc.detail}", file=sys.stderr)
    return status


class _Submission(NamedTuple):
    spec: dict[str, Any]
    logins: dict[str, Credentials]


def _check_admin_arguments(args: argparse.Namespace) -> _Submission:
    """Every argument of an admin command checked; what to submit (nothing for the others)."""
    if args.url is not None:
        check_url(args.url)
    if args.command == "cancel":
        cli_args.check_job_id(args.job_id)
        cli_args.check_reason(args.reason)
    if args.command == "prefetch":
        cli_args.check_node_id(args.node)
    if args.command == "api-keys":
        cli_keys.check(args)
    if args.command != "submit":
        return _Submission({}, {})
    cli_args.check_node_id(args.node)
    if args.job_id is not None:
        cli_args.check_job_id(args.job_id)
    if args.ttl is not None:
        cli_args.check_ttl(args.ttl)
    cli_args.parse_uploads(args.upload)
    if args.out is not None and not args.wait:
        raise JobError("bad_request", "--out needs --wait: outputs exist once the job ended")
    logins = cli_args.registry_logins(args.registry_logins)
    return _Submission(load_spec_file(args.spec_file), logins)


def _admin_command(args: argparse.Namespace) -> int:
    try:
        # The arguments first: one that is refused (exit 2) reaches nothing.
        submission = _check_admin_arguments(args)
        deployment = cli_deploy.check(args)
    except (AdminError, ConfigError, JobError, GatewayError) as exc:
        return _fail(exc, EXIT_USAGE)
    try:
        client = AdminClient.from_state_dir(args.state_dir, args.url)
        if args.command in cli_deploy.COMMANDS:
            return cli_deploy.run(args, client, deployment)
        if args.command == "submit":
            return _submit(args, client, submission)
        if args.command == "cancel":
            client.cancel(args.job_id, args.reason)
            return 0
        if args.command == "prefetch":
            print(client.prefetch(args.node, args.image))
            return 0
        if args.command == "api-keys":
            return cli_keys.run(args, client)
        return _jobs(args, client)
    except AdminError as exc:
        return _fail(exc, EXIT_ERROR)


def _key_command(args: argparse.Namespace) -> int:
    try:
        # A file where the folder should be, one not writable: a usage error, before
        # anything is made.
        cli_args.check_state_dir(args.state_dir)
    except ConfigError as exc:
        return _fail(exc, EXIT_USAGE)
    try:
        key = keys.load_or_create(args.state_dir) if args.create else keys.load(args.state_dir)
    except KeyFileError as exc:
        # No key where one was asked for: a state directory mistyped, most likely.
        return _fail(exc, EXIT_USAGE if exc.code == "key_missing" else EXIT_ERROR)
    print(f"key id:      {key.key_id}")
    print(f"public key:  {key.public_key_b64}")
    return 0


def _serve_command(args: argparse.Namespace) -> int:
    try:
        # Read-only checks of every argument before the key, the database or the admin
        # file is written: a refused argument leaves nothing behind.
        args.artifacts_port = cli_args.artifacts_port(args.port, args.artifacts_port)
        args.gateway_port = cli_args.gateway_port(args.port, args.gateway_port)
        if args.artifacts_url is not None:
            args.artifacts_url = cli_args.public_url(args.artifacts_url)
        if args.peer_url is not None:
            args.peer_url = cli_args.public_url(args.peer_url, "--peer-url")
        ssl_context = None
        if args.tls_cert is not None:
            ssl_context = cli_args.tls_context(args.tls_cert, args.tls_key)
        cli_args.check_addresses(
            [
                (args.host, args.port),
                ("127.0.0.1", args.admin_port),
                (args.host, args.artifacts_port),
                (args.host, args.gateway_port),
            ]
        )
        args.db = cli_args.check_db(args.db)
        cli_args.check_state_dir(args.state_dir)
        settings = admission.settings_from(args)
        pinner = cli_args.image_pinner(args.registry_logins, args.registry_ca)
    except ConfigError as exc:
        return _fail(exc, EXIT_USAGE)
    # The process's own policy, as keep_frozen's: a tunnel's relayed buffers reuse their
    # pages (a third of the relay's CPU was page faults).
    reuse_freed_memory()
    try:
        asyncio.run(_serve(args, ssl_context, settings, pinner))
    except CoordinatorError as exc:
        return _fail(exc, EXIT_ERROR)
    except driver_errors() as exc:
        # What check_db cannot see: a corrupt page, a server gone since.
        print(
            f"gpu-coordinator: error [store_error]: {describe(args.db)}: {redact(str(exc))}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except OSError as exc:
        # The address taken since it was checked, a full disk.
        print(f"gpu-coordinator: error [os_error]: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _drop_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for the reader that left must
    not fail again when the interpreter flushes it at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        status = _command(parser, args)
        # Flushed here, not at exit, so that a reader gone is seen (and said) here.
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    return status


def _command(parser: _Parser, args: argparse.Namespace) -> int:
    if args.command in {"submit", "cancel", "prefetch", "jobs", "api-keys"} | cli_deploy.COMMANDS:
        return _admin_command(args)
    if args.command == "key":
        return _key_command(args)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    return _serve_command(args)


if __name__ == "__main__":
    sys.exit(main())
