"""A service's network: a bridge of its own, internal, and closed to the host.

A service container must be reachable by the agent (it carries the service's requests)
and reach nothing itself. Docker's ``internal`` network gives no route out, but the host
still has an address on the bridge, and every host service listening on all addresses
(an SSH server, a database, a coordinator) would answer the container there. So each
service's bridge is named ``gpasvc<8 hex>``, and one firewall rule, inserted before the
first service starts, drops every connection the host is offered on such a bridge; the
answers to the agent's own connections (``ESTABLISHED``) still pass::

    iptables -I INPUT -i gpasvc+ -m conntrack ! --ctstate ESTABLISHED,RELATED -j DROP

Without it (no ``iptables``, or no right to change the rules) no service starts:
``service_network_open``. Each service gets its own network, so services of different
jobs cannot reach each other either.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from typing import Final

from sandbox.container import LABEL_JOB, LABEL_MANAGED, LABEL_RUNNER
from sandbox.engine_types import NetworkConfig
from sandbox.errors import RunError

__all__ = ["BRIDGE_PREFIX", "HOST_RULE", "close_host", "network_config", "network_name"]

BRIDGE_PREFIX: Final = "gpasvc"
#: The INPUT rule, as ``iptables -C/-I`` take it after the chain's name.
HOST_RULE: Final = (
    "-i", f"{BRIDGE_PREFIX}+",
    "-m", "conntrack", "!", "--ctstate", "ESTABLISHED,RELATED",
    "-j", "DROP",
)  # fmt: skip


def network_name(job_id: str) -> str:
    """The engine's name of the network of ``job_id``'s service."""
    return f"gpu-agent-svc-{job_id}"


def network_config(job_id: str, runner: str) -> NetworkConfig:
    """The body that creates the network of ``job_id``'s service: internal, no masquerade,
    its bridge named for the host rule, labelled as the runner's containers are."""
    bridge = BRIDGE_PREFIX + hashlib.sha256(job_id.encode()).hexdigest()[:8]
    return NetworkConfig(
        name=network_name(job_id),
        internal=True,
        labels={LABEL_MANAGED: "1", LABEL_JOB: job_id, LABEL_RUNNER: runner},
        options={
            "com.docker.network.bridge.name": bridge,
            "com.docker.network.bridge.enable_ip_masquerade": "false",
        },
    )


async def close_host() -> None:
    """Make sure the host rule is in place, for IPv4 and (where there is one) IPv6.

    Raises:
        RunError: ``service_network_open`` when it is not and cannot be put in place.
    """
    tools = [tool for tool in ("iptables", "ip6tables") if shutil.which(tool)]
    if "iptables" not in tools:
        raise RunError("service_network_open", "no iptables: the host would be open to services")
    for tool in tools:
        if await _run(tool, "-C", "INPUT", *HOST_RULE) == 0:
            continue
        if (status := await _run(tool, "-I", "INPUT", *HOST_RULE)) != 0:
            raise RunError(
                "service_network_open",
                f"{tool} could not close the host to services (exit {status}): the agent"
                " needs CAP_NET_ADMIN, or the rule in place (docs/services.md)",
            )


async def _run(*argv: str) -> int:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await process.wait()
