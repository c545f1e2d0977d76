"""The allocator settings both ends of a tunnel run with: buffers reused, not faulted in anew.

A relay reads and writes buffers of 64 KiB-1 MiB, one after another: the agent its
service's reads and the messages it frames, the coordinator the messages it receives
and the chunks its readers take. glibc serves a block that size with ``mmap`` (or trims
the heap's top as soon as it is freed), so each new buffer is fresh pages: a page fault
per 4 KiB, a quarter of the agent's CPU and a third of the coordinator's when they relay
a bulk answer (issue 13). Serving blocks under 1 MiB from the heap and keeping up to
16 MiB freed at its top lets the next buffer reuse the last one's pages; the cost is at
most that much memory held back from the system while idle.

Here, beside the protocol both sides share, because both processes call it at start-up
(``gpu-agent run``, ``gpu-coordinator serve``); it does no I/O.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Final

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "reuse_freed_memory"]

_log = logging.getLogger(__name__)

#: Blocks under this many bytes come from the heap (glibc's M_MMAP_THRESHOLD).
MMAP_THRESHOLD: Final = 1 << 20
#: Free memory at the heap's top kept up to this many bytes (glibc's M_TRIM_THRESHOLD).
TRIM_THRESHOLD: Final = 16 << 20
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3


def reuse_freed_memory() -> bool:
    """Set the thresholds, for the whole process; False where the C library is not glibc
    (musl has no such knobs: nothing to do)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    if not done:
        _log.warning("the C library refused the allocator's thresholds: left as they were")
    return bool(done)
