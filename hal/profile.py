"""Take the whole machine's profile: host and GPUs, discovered side by side."""

from __future__ import annotations

import time

from hal import __version__
from hal.backend import HalConfig
from hal.registry import PendingDiscovery
from hal.types import Profile

__all__ = ["take_profile"]


def take_profile(config: HalConfig) -> Profile:
    """Profile the host while the GPU backends run their isolated discovery."""
    # Longest first: the discovery children fork before anything else is imported, then
    # the engine gets its question, and both work while psutil is imported and read.
    pending = PendingDiscovery(config)
    from hal.runtime import RuntimeProbe

    with RuntimeProbe(config.docker_socket, config.cdi_dirs) as runtime:
        from hal.host import host_profile

        host = host_profile(config, runtime)
    discovery = pending.result()
    return Profile(
        agent_version=__version__,
        taken_at=time.time(),
        host=host,
        gpus=discovery.gpus,
        backends=discovery.backends,
    )
