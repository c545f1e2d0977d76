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
    pending = PendingDiscovery(config)
    # Imported only now, so that the discovery children start without waiting for psutil.
    from hal.host import host_profile

    host = host_profile(config)
    discovery = pending.result()
    return Profile(
        agent_version=__version__,
        taken_at=time.time(),
        host=host,
        gpus=discovery.gpus,
        backends=discovery.backends,
    )
