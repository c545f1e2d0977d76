"""The gateway's own answers (pure): OpenAI's error shape, its codes' statuses, the
model list, and what a request's body must hold.

Errors are ``{"error": {"message", "type", "code"}}`` as OpenAI's API answers them, so
that its clients raise the matching exception (``AuthenticationError`` for 401,
``RateLimitError`` for 429, ``NotFoundError`` for 404, ...).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from coordinator.errors import GatewayError

__all__ = [
    "ROUTES",
    "STATUS",
    "Asked",
    "error_body",
    "error_event",
    "models_body",
    "read_model",
]

#: The paths served by a replica; the request's ``model`` says which.
ROUTES: Final = frozenset(("/v1/chat/completions", "/v1/completions", "/v1/embeddings"))

#: Each gateway code's HTTP status and OpenAI error type.
STATUS: Final[dict[str, tuple[int, str]]] = {
    "bad_request": (400, "invalid_request_error"),
    "invalid_api_key": (401, "invalid_request_error"),
    "bad_peer": (403, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "model_not_found": (404, "invalid_request_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "request_timeout": (408, "invalid_request_error"),
    "request_too_large": (413, "invalid_request_error"),
    "rate_limited": (429, "rate_limit_error"),
    "headers_too_large": (431, "invalid_request_error"),
    "upstream_error": (502, "server_error"),
    "response_too_large": (502, "server_error"),
    "no_ready_replica": (503, "server_error"),
    "replicas_busy": (503, "server_error"),
    "gateway_busy": (503, "server_error"),
    "upstream_timeout": (504, "server_error"),
}


def error_body(exc: GatewayError) -> tuple[int, bytes]:
    """The status and JSON body of a refusal."""
    status, kind = STATUS.get(exc.code, (500, "server_error"))
    body = {"error": {"message": exc.detail or exc.code, "type": kind, "code": exc.code}}
    return status, msgspec.json.encode(body)


def error_event(exc: GatewayError) -> bytes:
    """A server-sent event that ends a stream with an error (OpenAI's clients raise it)."""
    return b"data: " + error_body(exc)[1] + b"\n\n"


def models_body(models: list[str]) -> bytes:
    """``GET /v1/models``: the models of the ready replicas, sorted."""
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "gpu-agent"} for m in models]
    return msgspec.json.encode({"object": "list", "data": data})


class Asked(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway reads of a request's body: the model, and whether it streams."""

    model: str
    stream: bool


def read_model(body: bytes) -> Asked:
    """The request's ``model`` and ``stream``.

    Raises:
        GatewayError: ``bad_request``: not a JSON object, or no ``model`` string.
    """
    try:
        value: Any = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise GatewayError("bad_request", "the body is not JSON") from None
    except RecursionError:  # msgspec's own limit: a body of nested brackets
        raise GatewayError("bad_request", "the body is nested too deeply") from None
    if not isinstance(value, dict):
        raise GatewayError("bad_request", "the body is not a JSON object")
    model = value.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise GatewayError("bad_request", "the body names no model (a string)")
    return Asked(model=model, stream=value.get("stream") is True)
