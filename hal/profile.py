"""Take the whole machine's profile: host and GPUs, discovered side by side."""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

from hal.backend import HalConfig
from hal.host import host_profile
from hal.registry import PendingDiscovery
from hal.types import Profile

__all__ = ["agent_version", "take_profile"]


def agent_version() -> str:
    """The installed version of the agent."""
    try:
        return version("gpu-provider-agent")
    except PackageNotFoundError:
        return "0+unknown"


def take_profile(config: HalConfig) -> Profile:
    """Profile the host while the GPU backends run their isolated discovery."""
    pending = PendingDiscovery(config)
    host = host_profile(config)
    discovery = pending.result()
    return Profile(
        agent_version=agent_version(),
        taken_at=time.time(),
        host=host,
        gpus=discovery.gpus,
        backends=discovery.backends,
    )
