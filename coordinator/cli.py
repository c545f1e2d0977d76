"""``gpu-coordinator``: run the reference coordinator, or print its key for agents to pin."""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from coordinator import keys
from coordinator.errors import CoordinatorError
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
    key = commands.add_parser("key", help="print the key id and public key for agents to pin")
    key.add_argument("--state-dir", type=Path, default=_DEFAULT_STATE_DIR, help="signing key")
    return parser


def _ready(coordinator: Coordinator) -> None:
    print(f"listening on {coordinator.url}", flush=True)
    print(f"dashboard at {coordinator.dashboard_url}", flush=True)
    print(f"key id {coordinator.key.key_id}", flush=True)


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
        )
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
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
