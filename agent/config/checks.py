"""The checks of single configuration values: URLs, addresses, paths and names."""

from __future__ import annotations

import ipaddress
import urllib.parse
from pathlib import Path

__all__ = [
    "check_absolute",
    "check_no_nul",
    "check_url",
    "is_loopback",
    "split_host_port",
]


def check_url(url: str, allow_plaintext: bool) -> None:
    """Raise ValueError ("url: ...") unless ``url`` is a websocket URL the link can use."""
    # The link hands the URL to websockets at every connect: what it cannot use, or any
    # fault urlsplit only finds when asked (the port), must stop the agent at start.
    from websockets.exceptions import InvalidURI
    from websockets.uri import parse_uri

    if not url.isprintable() or any(c.isspace() for c in url) or not _is_utf8(url):
        raise ValueError(f"url: {url!r}: spaces, control characters or undecodable bytes")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL"
        raise ValueError(f"url: {url!r}: {exc}") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"url: {url!r}: use ws://host:port/path or wss://host:port/path")
    try:
        port = parts.port
    except ValueError:
        port = 0  # not a number, or out of range: urlsplit only says so when asked
    if port == 0:
        raise ValueError(f"url: {url!r}: the port must be a number from 1 to 65535")
    try:
        parse_uri(url)
    except InvalidURI as exc:
        raise ValueError(f"url: {exc}") from None
    if parts.scheme == "ws" and not allow_plaintext and not is_loopback(parts.hostname):
        # The handshake proves who is at the other end, but nothing after it is bound to
        # the connection: on plain ws:// anyone on the path could forge acks.
        raise ValueError(
            f"url: {url!r}: ws:// off this machine lets anyone on the path forge "
            "acknowledgements; use wss:// (or set coordinator.allow_plaintext)"
        )


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: bytes that were not UTF-8
        return False
    return True


def check_absolute(key: str, path: Path) -> None:
    """Raise ValueError ("key: ...") unless ``path`` is absolute, without NUL."""
    if not path.is_absolute():
        raise ValueError(f"{key}: {str(path)!r} is not an absolute path")
    check_no_nul(key, str(path))


def check_no_nul(key: str, text: str) -> None:
    """Raise ValueError ("key: ...") if ``text`` holds a NUL character."""
    # TOML may spell one ("\u0000"); no file or group name holds one.
    if "\0" in text:
        raise ValueError(f"{key}: {text!r} holds a NUL character")


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) as host and port; ValueError ("listen: ...")."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"listen: {text!r} is not host:port (IPv6: [::1]:9464)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
