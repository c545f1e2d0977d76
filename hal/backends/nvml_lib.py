"""The boundary to NVML: loading the library and turning its errors into ours.

Everything NVIDIA goes through the real ``nvidia-ml-py`` binding (module ``pynvml``);
this module is the one place that knows NVML's return codes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any, TypeVar

import pynvml

from hal.errors import BackendUnavailable, DeviceLost
from hal.types import UNSUPPORTED, Reading, Unavailable, Unsupported

__all__ = ["backend_error", "error_reading", "init", "reading"]

T = TypeVar("T")

# NVML return code -> our stable code, for errors that disable the whole backend.
_BACKEND_CODES = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: "library_missing",
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "driver_not_loaded",
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: "driver_library_mismatch",
    pynvml.NVML_ERROR_NO_PERMISSION: "permission_denied",
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: "function_missing",
    pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES: "insufficient_resources",
}

# Codes that mean "this device or driver cannot report this", not "failed this time".
_UNSUPPORTED_CODES = frozenset(
    {
        pynvml.NVML_ERROR_NOT_SUPPORTED,
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
        pynvml.NVML_ERROR_NOT_FOUND,
    }
)


def init(library_path: str | None) -> None:
    """Load NVML (from ``library_path`` when given) and initialise it.

    Raises:
        BackendUnavailable: with the code of why NVML cannot serve.
    """
    if library_path is not None and getattr(pynvml.nvmlLib, "_name", None) != library_path:
        with pynvml.libLoadLock:
            try:
                # pynvml loads "libnvidia-ml.so.1" by name unless its handle is already set.
                pynvml.nvmlLib = ctypes.CDLL(library_path)
            except OSError as exc:
                raise BackendUnavailable("library_missing", str(exc)) from exc
            # Function pointers pynvml cached belong to the library loaded before.
            pynvml._nvmlGetFunctionPointer_cache.clear()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise backend_error(exc) from exc


def backend_error(exc: pynvml.NVMLError) -> BackendUnavailable:
    """The backend-level error for an NVML error."""
    code = _BACKEND_CODES.get(exc.value, "library_error")
    return BackendUnavailable(code, f"NVML: {exc}")


def reading(fn: Callable[..., T], *args: Any) -> Reading[T]:
    """Call an NVML function; return its value or the reading that says why there is none.

    Raises:
        DeviceLost: NVML reports the GPU fell off the bus.
    """
    try:
        return fn(*args)
    except pynvml.NVMLError as exc:
        return error_reading(exc)


def error_reading(exc: pynvml.NVMLError) -> Unsupported | Unavailable:
    """The reading for a failed NVML call; a lost GPU raises instead.

    Raises:
        DeviceLost: NVML reports the GPU fell off the bus.
    """
    if exc.value == pynvml.NVML_ERROR_GPU_IS_LOST:
        raise DeviceLost(str(exc))
    if exc.value in _UNSUPPORTED_CODES:
        return UNSUPPORTED
    if exc.value == pynvml.NVML_ERROR_NO_PERMISSION:
        return Unavailable("permission_denied", str(exc))
    return Unavailable("nvml_error", str(exc))
