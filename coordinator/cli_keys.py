"""``gpu-coordinator api-keys create|list|revoke``: the gateway's client keys, through the
admin API of a running coordinator. (``key`` is the coordinator's own signing key.)"""

from __future__ import annotations

import argparse
import json
from typing import Any

from coordinator.client import AdminClient
from coordinator.gateway.keys_api import (
    DEFAULT_RATE_PER_MIN,
    check_key_id,
    check_name,
    check_rate,
)

__all__ = ["add_parser", "check", "run"]


def add_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``api-keys`` and its subcommands (each with the admin options of ``parents``)."""
    keys = commands.add_parser("api-keys", help="the gateway's client API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", parents=parents, help="make a key; print it once")
    create.add_argument("name", metavar="NAME", help="who the key is for")
    create.add_argument(
        "--rate",
        type=int,
        default=DEFAULT_RATE_PER_MIN,
        help=f"requests a minute (default {DEFAULT_RATE_PER_MIN})",
    )
    listing = actions.add_parser("list", parents=parents, help="list the keys (not their text)")
    listing.add_argument("--json", action="store_true", help="the API's JSON")
    revoke = actions.add_parser("revoke", parents=parents, help="refuse a key from now on")
    revoke.add_argument("key_id", metavar="KEY_ID")


def check(args: argparse.Namespace) -> None:
    """Refuse bad arguments before the API is reached (GatewayError, a usage error)."""
    if args.keys_command == "create":
        check_name(args.name)
        check_rate(args.rate)
    elif args.keys_command == "revoke":
        check_key_id(args.key_id)


def run(args: argparse.Namespace, client: AdminClient) -> int:
    """Carry out the subcommand; the exit status."""
    if args.keys_command == "create":
        key = client.create_key(args.name, args.rate)
        print(f"key id: {key.get('key_id')}")
        print(f"key:    {key.get('key')}")
        print("(shown once: the coordinator keeps only its hash)")
        return 0
    if args.keys_command == "revoke":
        key = client.revoke_key(args.key_id)
        print(f"{key.get('key_id')} revoked")
        return 0
    keys = client.keys()
    if args.json:
        print(json.dumps({"keys": keys}, indent=2))
        return 0
    print(f"{'KEY ID':<22} {'RATE/MIN':>8} {'STATE':<8} NAME")
    for key in keys:
        state = "revoked" if key.get("revoked") is not None else "active"
        key_id, rate = key.get("key_id"), key.get("rate_per_min")
        print(f"{key_id!s:<22} {rate!s:>8} {state:<8} {key.get('name')}")
    return 0
