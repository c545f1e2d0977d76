"""``gpu-coordinator``: run the reference coordinator, print its key for agents to pin, and
submit, cancel and list jobs through the admin API of a running one."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from coordinator import keys
from coordinator.client import AdminClient, load_spec_file
from coordinator.errors import AdminError, CoordinatorError
from coordinator.server import Coordinator, serve

__all__ = ["EXIT_ERROR", "EXIT_USAGE", "main"]

EXIT_ERROR = 1
EXIT_USAGE = 2
_DEFAULT_STATE_DIR = Path("coordinator-state")


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
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir", type=Path, default=_DEFAULT_STATE_DIR, help="the coordinator's (admin.json)"
    )
    parser.add_argument("--url", help="admin API URL (default: the one in admin.json)")


def _parser() -> _Parser:
    parser = _Parser(prog="gpu-coordinator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("serve", help="accept agents; serve the read API and dashboard")
    run.add_argument("--host", default="127.0.0.1", help="address to listen on")
    run.add_argument("--port", type=_port, default=8765, help="TCP port (0: any free one)")
    run.add_argument("--db", type=Path, required=True, help="SQLite file of the store")
    run.add_argument("--state-dir", type=Path, default=_DEFAULT_STATE_DIR, help="signing key")
    run.add_argument("--tls-cert", type=Path, help="PEM certificate chain (TLS on)")
    run.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    run.add_argument(
        "--admin-port", type=_port, default=0, help="admin API port on 127.0.0.1 (0: any free)"
    )
    key = commands.add_parser("key", help="print the key id and public key for agents to pin")
    key.add_argument("--state-dir", type=Path, default=_DEFAULT_STATE_DIR, help="signing key")
    submit = commands.add_parser("submit", help="sign and send a job to a node; print its id")
    submit.add_argument("spec_file", type=Path, metavar="SPEC_FILE", help=".toml or .json spec")
    submit.add_argument("--node", required=True, help="the node id to run it")
    submit.add_argument("--job-id", help="the job id (default: job-<random hex>)")
    submit.add_argument("--ttl", type=_seconds, help="seconds the offer stays valid (1 hour)")
    submit.add_argument(
        "--wait", action="store_true", help="wait until it ends; exit 0 only if completed"
    )
    submit.add_argument("--timeout", type=_seconds, help="with --wait: give up after this")
    _admin_options(submit)
    cancel = commands.add_parser("cancel", help="ask a job's node to stop it")
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.add_argument("--reason", default="", help="told to the node")
    _admin_options(cancel)
    jobs = commands.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--json", action="store_true", help="the API's JSON instead of a table")
    _admin_options(jobs)
    return parser


def _ready(coordinator: Coordinator) -> None:
    print(f"listening on {coordinator.url}", flush=True)
    print(f"dashboard at {coordinator.dashboard_url}", flush=True)
    print(f"key id {coordinator.key.key_id}", flush=True)
    print(f"admin API at {coordinator.admin_url} (token in {coordinator.admin_file})", flush=True)


def _tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 or later) from PEM files; a coded error if unusable."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except ssl.SSLError as exc:  # not PEM, or the key does not match the certificate
        raise CoordinatorError("tls_invalid", f"{cert} / {key}: {exc}") from None
    except OSError as exc:
        raise CoordinatorError("tls_unreadable", str(exc)) from None
    return context


async def _serve(args: argparse.Namespace, ssl_context: ssl.SSLContext | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
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
        )
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _submit(args: argparse.Namespace, client: AdminClient, spec: dict[str, Any]) -> int:
    job_id = client.submit(args.node, spec, job_id=args.job_id, ttl_s=args.ttl)
    print(job_id, flush=True)
    if not args.wait:
        return 0
    job = client.wait(job_id, timeout_s=args.timeout)
    print(_outcome(job))
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
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(job["updated"])))
        print(f"{job['job_id']:<24} {job['node_id']:<32} {job['state']:<12} {updated}")
    return 0


def _admin_command(args: argparse.Namespace) -> int:
    try:
        # The spec file first: a bad argument is refused before anything is reached.
        spec = load_spec_file(args.spec_file) if args.command == "submit" else {}
        client = AdminClient.from_state_dir(args.state_dir, args.url)
        if args.command == "submit":
            return _submit(args, client, spec)
        if args.command == "cancel":
            client.cancel(args.job_id, args.reason)
            return 0
        return _jobs(args, client)
    except AdminError as exc:
        print(f"gpu-coordinator: error [{exc.code}]: {exc.detail}", file=sys.stderr)
        # A spec file that cannot be used is a bad argument, like argparse's own.
        return EXIT_USAGE if exc.code == "bad_spec" and args.command == "submit" else EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command in ("submit", "cancel", "jobs"):
        return _admin_command(args)
    if args.command == "serve" and (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.command == "serve" and args.tls_cert is not None:
        try:
            ssl_context = _tls_context(args.tls_cert, args.tls_key)
        except CoordinatorError as exc:
            print(f"gpu-coordinator: error [{exc.code}]: {exc.detail}", file=sys.stderr)
            return EXIT_USAGE
    else:
        ssl_context = None
    try:
        if args.command == "key":
            key = keys.load_or_create(args.state_dir)
            print(f"key id:      {key.key_id}")
            print(f"public key:  {key.public_key_b64}")
        else:
            asyncio.run(_serve(args, ssl_context))
    except CoordinatorError as exc:
        print(f"gpu-coordinator: error [{exc.code}]: {exc.detail}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        # Mostly a port in use or a database that cannot be opened.
        print(f"gpu-coordinator: error [os_error]: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
