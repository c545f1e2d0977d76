"""The API's routes of the gateway: client keys (admin listener) and request records.

- ``POST /api/keys`` ``{"name", "rate_per_min"?}`` -> 201 ``{"key_id", "name",
  "rate_per_min", "created", "revoked": null, "key"}``: the key's text, shown this once
- ``GET /api/keys`` -> ``{"keys": [...]}`` (without their text)
- ``POST /api/keys/{id}/revoke`` -> ``{...the key, "revoked": time}``
- ``GET /api/requests?limit=N`` (read API) -> ``{"requests": [...]}``, newest first
"""

from __future__ import annotations

import re
import time
from http import HTTPStatus
from typing import Annotated, Final

import msgspec

from coordinator.api_util import MAX_LIMIT, HttpAnswer, coded_error, json_answer
from coordinator.errors import GatewayError
from coordinator.store import Store

__all__ = [
    "DEFAULT_RATE_PER_MIN",
    "MAX_RATE_PER_MIN",
    "check_key_id",
    "check_name",
    "check_rate",
    "create",
    "listing",
    "recent_requests",
    "revoke",
]

DEFAULT_RATE_PER_MIN: Final = 60
MAX_RATE_PER_MIN: Final = 1_000_000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:@/+-]{0,63}")
_KEY_ID = re.compile(r"key-[0-9a-f]{16}")


class _NewKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(max_length=64)]
    rate_per_min: int = DEFAULT_RATE_PER_MIN


def check_name(name: str) -> None:
    """Refuse a key name that is not 1-64 printable characters (``bad_key_name``)."""
    if not _NAME.fullmatch(name):
        raise GatewayError(
            "bad_key_name", f"{name!r}: 1-64 of A-Z a-z 0-9 space . _ : @ / + -, a letter first"
        )


def check_rate(rate: int) -> None:
    """Refuse a rate out of 1..MAX_RATE_PER_MIN (``bad_rate``)."""
    if isinstance(rate, bool) or not 1 <= rate <= MAX_RATE_PER_MIN:
        raise GatewayError("bad_rate", f"rate_per_min is 1 to {MAX_RATE_PER_MIN}")


def check_key_id(key_id: str) -> None:
    """Refuse what is no key id (``unknown_key_id``: no key has it)."""
    if not _KEY_ID.fullmatch(key_id):
        raise GatewayError("unknown_key_id", f"{key_id!r} is no key id (key-<16 hex>)")


def create(store: Store, body: bytes) -> HttpAnswer:
    """Make a key: its text is in this answer only."""
    try:
        asked = msgspec.json.decode(body, type=_NewKey)
        check_name(asked.name)
        check_rate(asked.rate_per_min)
    except msgspec.DecodeError as exc:
        return coded_error(HTTPStatus.BAD_REQUEST, "bad_request", str(exc))
    except GatewayError as exc:
        return coded_error(HTTPStatus.BAD_REQUEST, exc.code, exc.detail)
    key, text = store.api_keys.create(asked.name, asked.rate_per_min, time.time())
    return json_answer(msgspec.to_builtins(key) | {"key": text}, HTTPStatus.CREATED)


def listing(store: Store) -> HttpAnswer:
    """Every key, without its text."""
    return json_answer({"keys": msgspec.to_builtins(store.api_keys.all())})


def revoke(store: Store, key_id: str) -> HttpAnswer:
    """Revoke a key: the gateway refuses it from the next request on."""
    try:
        check_key_id(key_id)
        key = store.api_keys.revoke(key_id, time.time())
    except GatewayError as exc:
        return coded_error(HTTPStatus.NOT_FOUND, exc.code, exc.detail)
    return json_answer(msgspec.to_builtins(key))


def recent_requests(store: Store, query: dict[str, list[str]]) -> HttpAnswer:
    """The newest request records, at most ``limit`` (at most MAX_LIMIT)."""
    try:
        limit = min(int(query.get("limit", [str(MAX_LIMIT)])[0]), MAX_LIMIT)
    except ValueError:
        return coded_error(HTTPStatus.BAD_REQUEST, "bad_request", "limit is an integer")
    if limit < 1:
        return coded_error(HTTPStatus.BAD_REQUEST, "bad_request", "limit >= 1")
    return json_answer({"requests": msgspec.to_builtins(store.requests.recent(limit))})
