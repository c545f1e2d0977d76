"""Input URLs: what one may be, and whether its host is one a policy allows.

Both the spec (the URL a job names) and the agent's fetcher (every redirect it is sent)
hold URLs to :func:`url_problem`; the policy's host patterns are matched by
:func:`host_allowed`, on the host name as :mod:`urllib.parse` reads it. The characters and
the host are kept plain enough that no other parser (httpx's) reads the host otherwise.
"""

from __future__ import annotations

import fnmatch
import re
import urllib.parse

__all__ = ["MAX_URL_CHARS", "host_allowed", "url_problem"]

MAX_URL_CHARS = 2048
"""The longest input URL."""

# RFC 3986's characters (unreserved, reserved, '%'): no backslash or quote a parser might
# read otherwise; and a host name, an IPv4 or an IPv6 address, nothing else.
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_URL_HOST = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|[0-9a-f:.]+")


def url_problem(url: str) -> str | None:
    """What makes ``url`` unfit as an input URL, or None: https or http, a host name or
    address, no credentials, no fragment, RFC 3986 characters, at most
    :data:`MAX_URL_CHARS`."""
    if len(url) > MAX_URL_CHARS:
        return f"longer than {MAX_URL_CHARS} characters"
    if not _URL_CHARS.fullmatch(url):
        return "characters outside RFC 3986 (percent-encode them)"
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in ("https", "http"):
        return f"scheme {parts.scheme!r}: only https and http (the digest protects http)"
    if not host:
        return "no host"
    if not _URL_HOST.fullmatch(host):
        return f"{host!r} is not a host name or an IP address"
    if parts.username is not None or parts.password is not None:
        return "credentials in a URL would end up in logs: not allowed"
    if parts.fragment:
        return "a fragment is never sent to the server: remove it"
    return None


def host_allowed(url: str, patterns: list[str]) -> bool:
    """Whether the host of ``url`` matches one of the policy's input host patterns."""
    try:
        host = urllib.parse.urlsplit(url).hostname
    except ValueError:
        return False
    return bool(host) and any(fnmatch.fnmatchcase(str(host), p.lower()) for p in patterns)
