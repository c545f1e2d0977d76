"""Take the whole machine's profile: host and GPUs, discovered side by side."""

from __future__ import annotations

import time
from types import TracebackType

from hal import __version__
from hal.backend import HalConfig
from hal.machine import PendingDiscovery
from hal.runtime import RuntimeProbe
from hal.types import Profile

__all__ = ["PendingProfile", "take_profile"]


def take_profile(config: HalConfig) -> Profile:
    """Profile the host while the GPU backends run their isolated discovery."""
    with PendingProfile(config) as pending:
        return pending.result()


class PendingProfile:
    """A profile whose slow parts are under way; :meth:`result` does the rest and waits.

    Starting it asks the Docker engine and forks the discovery children, so a caller with
    other work to do (a command line still to parse) can start it first. Close it (or use
    it as a context manager) to stop what a result was never taken from.
    """

    def __init__(self, config: HalConfig, runtime: RuntimeProbe | None = None) -> None:
        self._config = config
        # Slowest first: the engine gets its question (unless the caller asked it already)
        # before the discovery children fork, and both work while the caller goes on;
        # psutil is imported only later.
        if runtime is not None and runtime.docker_socket != config.docker_socket:
            runtime.close()
            runtime = None
        self._runtime = runtime or RuntimeProbe(config.docker_socket)
        try:
            self._discovery = PendingDiscovery(config)
        except BaseException:
            self._runtime.close()
            raise

    def result(self) -> Profile:
        """The whole profile: the host read now, the GPUs as discovery found them."""
        from hal.host import host_profile

        host = host_profile(self._config, self._runtime)
        discovery = self._discovery.result()
        return Profile(
            agent_version=__version__,
            taken_at=time.time(),
            host=host,
            gpus=discovery.gpus,
            backends=discovery.backends,
        )

    def close(self) -> None:
        """Drop the engine's unread answer and stop discovery children still running."""
        self._runtime.close()
        self._discovery.close()

    def __enter__(self) -> PendingProfile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
