"""Take the whole machine's profile: host and GPUs, discovered side by side."""

from __future__ import annotations

import threading
import time

from hal import __version__
from hal.backend import HalConfig
from hal.registry import PendingDiscovery
from hal.runtime import runtime_info
from hal.types import Profile, RuntimeInfo

__all__ = ["take_profile"]


def take_profile(config: HalConfig) -> Profile:
    """Profile the host while the GPU backends run their isolated discovery."""
    pending = PendingDiscovery(config)
    # The engine answers in milliseconds: ask it in a thread while psutil is imported and
    # read. psutil is imported only now, so that the discovery children start sooner.
    runtime: list[RuntimeInfo] = []
    asking = threading.Thread(
        target=lambda: runtime.append(runtime_info(config.docker_socket, config.cdi_dirs)),
        name="docker-probe",
    )
    asking.start()
    from hal.host import host_profile

    asking.join()
    host = host_profile(config, runtime[0])
    discovery = pending.result()
    return Profile(
        agent_version=__version__,
        taken_at=time.time(),
        host=host,
        gpus=discovery.gpus,
        backends=discovery.backends,
    )
