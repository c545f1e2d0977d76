"""``gpu-coordinator deploy``, ``scale``, ``undeploy`` and ``deployments``: the admin API's
deployment routes from the command line (:mod:`coordinator.deployments_api`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from coordinator import cli_args
from coordinator.client import AdminClient, load_spec_file
from coordinator.deployments import DEFAULT_GRACE_S, MAX_REPLICAS, NAME
from coordinator.errors import JobError

__all__ = ["COMMANDS", "add_commands", "add_serve_options", "check", "run"]

#: The commands of this module.
COMMANDS: Final = frozenset({"deploy", "scale", "undeploy", "deployments"})


def add_commands(
    commands: Any,
    admin_options: Callable[[argparse.ArgumentParser], None],
    path: Callable[[str], Path],
) -> None:
    """Add the four commands to the subparsers ``commands``."""
    deploy = commands.add_parser(
        "deploy", help="keep N replicas of a service running, each on its own node if it can"
    )
    deploy.add_argument("spec_file", type=path, metavar="SPEC_FILE", help='kind = "service" spec')
    deploy.add_argument(
        "--replicas", type=int, default=1, help=f"how many (1..{MAX_REPLICAS}; default 1)"
    )
    deploy.add_argument("--name", help="the deployment's name (default: the file's stem)")
    deploy.add_argument(
        "--registry-logins",
        type=path,
        metavar="FILE",
        help="TOML file of a login to a private image's registry, sent in each replica's"
        " signed offer for the node's pull, and kept with the deployment (mode 600)",
    )
    admin_options(deploy)
    scale = commands.add_parser(
        "scale", help="change how many replicas a deployment keeps (in place, never short)"
    )
    scale.add_argument("name", metavar="NAME")
    scale.add_argument("--replicas", type=int, required=True, help=f"how many (1..{MAX_REPLICAS})")
    admin_options(scale)
    undeploy = commands.add_parser("undeploy", help="stop every replica of a deployment")
    undeploy.add_argument("name", metavar="NAME")
    admin_options(undeploy)
    listing = commands.add_parser("deployments", help="list deployments and their replicas")
    listing.add_argument("--json", action="store_true", help="the API's JSON instead of a table")
    admin_options(listing)


def add_serve_options(run: argparse.ArgumentParser, seconds: Callable[[str], float]) -> None:
    """Add ``serve``'s deployment options."""
    run.add_argument(
        "--deploy-grace",
        type=seconds,
        default=DEFAULT_GRACE_S,
        metavar="SECONDS",
        help=f"how long a node may be away before its replicas go elsewhere ({DEFAULT_GRACE_S:g})",
    )


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Every argument of a deployment command checked; the spec to deploy (or {}).

    Raises:
        JobError: ``bad_name``, ``bad_replicas``, ``not_a_service``, and the spec file's
            codes (:func:`coordinator.client.load_spec_file`).
        ConfigError: ``bad_logins_file`` (``--registry-logins``).
    """
    if args.command in ("undeploy", "scale"):
        _check_name(args.name, "")
    if args.command == "scale" and not 1 <= args.replicas <= MAX_REPLICAS:
        raise JobError("bad_replicas", f"--replicas {args.replicas}: 1..{MAX_REPLICAS}")
    if args.command != "deploy":
        return {}
    name = args.name if args.name is not None else args.spec_file.stem
    _check_name(name, "" if args.name is not None else " (the file's stem: give --name)")
    if not 1 <= args.replicas <= MAX_REPLICAS:
        raise JobError("bad_replicas", f"--replicas {args.replicas}: 1..{MAX_REPLICAS}")
    spec = load_spec_file(args.spec_file)
    if spec.get("kind") != "service":
        raise JobError("not_a_service", f'{args.spec_file}: a deployment runs kind = "service"')
    args.name = name
    args.logins = cli_args.registry_logins(args.registry_logins)
    return spec


def run(args: argparse.Namespace, client: AdminClient, spec: dict[str, Any]) -> int:
    """Carry a checked deployment command out; the exit status."""
    if args.command == "deploy":
        deployment = client.deploy(args.name, spec, args.replicas, args.logins)
        print(deployment.get("name"), flush=True)
        return 0
    if args.command == "scale":
        deployment = client.scale(args.name, args.replicas)
        print(f"{deployment.get('name')} {deployment.get('replicas')}", flush=True)
        return 0
    if args.command == "undeploy":
        for job_id in client.undeploy(args.name):
            print(job_id)
        return 0
    deployments = client.deployments()
    if args.json:
        print(json.dumps({"deployments": deployments}, indent=2))
        return 0
    print(f"{'DEPLOYMENT':<24} {'READY':<8} {'JOB':<24} {'NODE':<32} STATE")
    for deployment in deployments:
        ready = f"{deployment['ready']}/{deployment['replicas']}"
        replicas = deployment["live"] or [{}]
        for replica in replicas:
            job, node = replica.get("job_id", "-"), replica.get("node_id", "-")
            state = replica.get("state", "-")
            print(f"{deployment['name']:<24} {ready:<8} {job!s:<24} {node!s:<32} {state}")
    return 0


def _check_name(name: str, hint: str) -> None:
    if NAME.fullmatch(name) is None:
        raise JobError("bad_name", f"{name!r}: 1-63 of a-z 0-9 . _ -, from a letter or digit{hint}")
