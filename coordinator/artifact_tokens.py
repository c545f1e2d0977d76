"""The tokens in the coordinator's artifact upload URLs, sans I/O.

A token is ``<expiry>.<mac>``: the expiry in whole seconds since the epoch, and the
URL-safe base64 of HMAC-SHA256 over ``job id NUL output path NUL expiry`` under a secret
only the coordinator holds. It lets its bearer PUT one output of one job until it expires,
nothing else; it is signed into the offer, so only the node the offer went to has it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Final

from coordinator.errors import JobError

__all__ = ["SECRET_BYTES", "sign_token", "verify_token"]

#: Length of the HMAC secret.
SECRET_BYTES: Final = 32
_TOKEN = re.compile(r"([0-9]{1,12})\.([A-Za-z0-9_-]{43})")


def sign_token(secret: bytes, job_id: str, path: str, expires: int) -> str:
    """The token for PUTting ``path`` of ``job_id`` until ``expires``."""
    return f"{expires}.{_mac(secret, job_id, path, expires)}"


def verify_token(secret: bytes, token: str, *, job_id: str, path: str, now: float) -> None:
    """Check that ``token`` allows PUTting ``path`` of ``job_id`` at ``now``.

    Raises:
        JobError: ``bad_token`` (malformed, or made for another job or path, or under
            another secret), ``token_expired``.
    """
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise JobError("bad_token", "not an artifact token")
    expires = int(match.group(1))
    if not hmac.compare_digest(match.group(2), _mac(secret, job_id, path, expires)):
        raise JobError("bad_token", "the token is not for this job and output")
    if now > expires:
        raise JobError("token_expired", f"the token expired {now - expires:.0f} s ago")


def _mac(secret: bytes, job_id: str, path: str, expires: int) -> str:
    message = b"\0".join((job_id.encode(), path.encode(), str(expires).encode()))
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
