"""The X server's idle time, from its MIT-SCREEN-SAVER extension through ``libXss`` (ctypes).

The X server counts the time since its last input event, whatever the device;
``XScreenSaverQueryInfo`` hands it out in milliseconds. It needs ``DISPLAY`` and the right
to connect (the session's user, or its ``XAUTHORITY`` cookie), so it serves an agent run
inside the owner's desktop session, not a system service.

Xlib ends the process on a protocol error, or when the connection to its display breaks,
unless its handlers return: the error and I/O error handlers set here return (they are
process-wide, and no other code of the daemon uses Xlib), and so does the exit handler set
on every display opened (``XSetIOErrorExitHandler``, libX11 1.7, 2020), without which this
source is not used at all. A display that cannot be opened is tried again a minute later,
not every second.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from typing import Any

from hal.types import Reading, Unavailable

__all__ = ["X11Idle", "XLibraries", "load_libraries"]

_LIBX11 = "libX11.so.6"
_LIBXSS = "libXss.so.1"
_RETRY_S = 60.0
_MS = 1000.0


class _ScreenSaverInfo(ctypes.Structure):
    """``XScreenSaverInfo`` of ``<X11/extensions/scrnsaver.h>``."""

    _fields_ = (
        ("window", ctypes.c_ulong),
        ("state", ctypes.c_int),
        ("kind", ctypes.c_int),
        ("til_or_since", ctypes.c_ulong),
        ("idle", ctypes.c_ulong),
        ("event_mask", ctypes.c_ulong),
    )


# void (*XIOErrorExitHandler)(Display *, void *); int (*XErrorHandler)(Display *, XErrorEvent *);
# int (*XIOErrorHandler)(Display *)
_ExitHandler = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_ErrorHandler = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_IOErrorHandler = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


class XLibraries:
    """libX11 and libXss, loaded, with the prototypes of the functions used."""

    def __init__(self, x11: ctypes.CDLL, xss: ctypes.CDLL) -> None:
        self.x11 = x11
        self.xss = xss
        pointer, window = ctypes.c_void_p, ctypes.c_ulong
        _prototype(x11.XOpenDisplay, pointer, ctypes.c_char_p)
        _prototype(x11.XCloseDisplay, ctypes.c_int, pointer)
        _prototype(x11.XDefaultRootWindow, window, pointer)
        _prototype(x11.XFree, ctypes.c_int, pointer)
        _prototype(x11.XSetErrorHandler, pointer, _ErrorHandler)
        _prototype(x11.XSetIOErrorHandler, pointer, _IOErrorHandler)
        _prototype(x11.XSetIOErrorExitHandler, None, pointer, _ExitHandler, pointer)
        int_out = ctypes.POINTER(ctypes.c_int)
        _prototype(xss.XScreenSaverQueryExtension, ctypes.c_int, pointer, int_out, int_out)
        _prototype(xss.XScreenSaverAllocInfo, ctypes.POINTER(_ScreenSaverInfo))
        info_out = ctypes.POINTER(_ScreenSaverInfo)
        _prototype(xss.XScreenSaverQueryInfo, ctypes.c_int, pointer, window, info_out)


def load_libraries() -> XLibraries | Unavailable:
    """The X libraries, or why they cannot be used."""
    try:
        x11, xss = ctypes.CDLL(_LIBX11), ctypes.CDLL(_LIBXSS)
    except OSError as exc:
        return Unavailable("library_missing", f"{exc} (Debian: libx11-6, libxss1)")
    try:
        return XLibraries(x11, xss)
    except AttributeError as exc:
        # Before libX11 1.7 a broken connection ends the process: not worth an idle time.
        return Unavailable("library_too_old", f"{_LIBX11} lacks a function: {exc}")


class X11Idle:
    """Milliseconds since the X server's last input, in seconds."""

    name = "x11"

    def __init__(
        self, display: str | None = None, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.display = os.environ.get("DISPLAY", "") if display is None else display
        self._monotonic = monotonic
        self._libraries: XLibraries | Unavailable | None = None
        self._connection: Any = None
        self._info: Any = None
        self._broken = False
        self._retry_at = float("-inf")
        self._down = Unavailable("display_unreachable", "")
        """Why the display could not be used, given again until ``_retry_at``."""
        # Kept referenced: Xlib holds only the C pointers.
        self._on_exit = _ExitHandler(self._connection_broke)
        self._on_error = _ErrorHandler(lambda _display, _event: 0)
        self._on_io_error = _IOErrorHandler(lambda _display: 0)

    def read(self) -> Reading[float]:
        """Seconds since the last input the X server saw; unavailable with the reason."""
        if not self.display:
            return Unavailable("no_display", "DISPLAY is not set")
        if self._libraries is None:
            self._libraries = load_libraries()
        libraries = self._libraries
        if isinstance(libraries, Unavailable):
            return libraries
        connection = self._connect(libraries)
        if isinstance(connection, Unavailable):
            return connection
        root = libraries.x11.XDefaultRootWindow(connection)
        status = libraries.xss.XScreenSaverQueryInfo(connection, root, self._info)
        if self._broken:
            # Xlib has given the connection up; closing it would only fail again.
            self._connection, self._broken = None, False
            return self._give_up("display_lost", f"the connection to {self.display} broke")
        if not status:
            return Unavailable("x11_error", f"XScreenSaverQueryInfo failed on {self.display}")
        return float(self._info.contents.idle) / _MS

    def close(self) -> None:
        """Close the display; the next reading opens it again."""
        if self._connection is not None and isinstance(self._libraries, XLibraries):
            self._libraries.x11.XCloseDisplay(self._connection)
        self._connection = None

    def _connect(self, libraries: XLibraries) -> Any:
        if self._connection is not None:
            return self._connection
        if self._monotonic() < self._retry_at:
            return self._down
        x11, xss = libraries.x11, libraries.xss
        # Xlib's default handlers end the process; these return, and the exit handler
        # below keeps Xlib from ending it after them.
        x11.XSetErrorHandler(self._on_error)
        x11.XSetIOErrorHandler(self._on_io_error)
        connection = x11.XOpenDisplay(self.display.encode())
        if not connection:
            return self._give_up("display_unreachable", f"cannot open display {self.display}")
        x11.XSetIOErrorExitHandler(connection, self._on_exit, None)
        event_base, error_base = ctypes.c_int(), ctypes.c_int()
        if not xss.XScreenSaverQueryExtension(
            connection, ctypes.byref(event_base), ctypes.byref(error_base)
        ):
            x11.XCloseDisplay(connection)
            return self._give_up("no_extension", f"{self.display} has no MIT-SCREEN-SAVER")
        if self._info is None:
            self._info = xss.XScreenSaverAllocInfo()  # kept for the life of the process
        self._connection = connection
        return connection

    def _give_up(self, reason: str, detail: str) -> Unavailable:
        """Leave the display alone for a while, and say why."""
        self._retry_at = self._monotonic() + _RETRY_S
        self._down = Unavailable(reason, detail)
        return self._down

    def _connection_broke(self, _display: Any, _data: Any) -> None:
        self._broken = True


def _prototype(function: Any, result: Any, *arguments: Any) -> None:
    function.restype = result
    function.argtypes = arguments
