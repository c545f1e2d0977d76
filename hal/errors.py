"""Errors of the hardware abstraction layer.

Every error carries a stable ``code`` that can travel to a coordinator, and is grouped by
how a caller reacts to it::

    HalError                       base; never raised itself
    +-- BadConfig                  a setting is wrong (refuse to start, say which)
    |     code: bad_config
    +-- BackendUnavailable         a whole backend cannot serve (skip it, report why)
    |     codes: library_missing, driver_not_loaded, driver_library_mismatch,
    |            permission_denied, no_devices, function_missing, library_error,
    |            insufficient_resources
    +-- DiscoveryFailed            isolated discovery did not come back
    |     codes: timeout, crashed, bad_result
    +-- DeviceLost                 one device fell off the bus (mark it lost, recover later)
    |     code: gpu_lost
    +-- CallFailed                 one call to a device's library failed, the device still
          there (report the reading or the request with the reason)
          codes: unsupported, not_found, permission_denied, invalid_argument, timeout,
                 nvml_error
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "BadConfig",
    "CallFailed",
    "DeviceLost",
    "DiscoveryFailed",
    "HalError",
]


class HalError(Exception):
    """Base of every HAL error; ``code`` is stable, ``detail`` is for humans."""

    code: str = "hal_error"

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class BadConfig(HalError):
    """A HAL setting (from the environment or a file) is invalid."""

    def __init__(self, detail: str) -> None:
        super().__init__("bad_config", detail)


class BackendUnavailable(HalError):
    """A backend cannot serve at all on this machine."""


class DiscoveryFailed(HalError):
    """Device discovery, run in an isolated child process, did not return a result."""


class DeviceLost(HalError):
    """A device disappeared mid-run (NVML ``GpuIsLost`` or its sysfs node vanished)."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("gpu_lost", detail)


class CallFailed(HalError):
    """One call to a device's library failed; the device is still there.

    Raised by the NVML boundary (:mod:`hal.backends.nvml`) for a call whose answer is
    needed; a reading turns it into unsupported or unavailable instead.
    """
