"""Errors of the reference coordinator, each with a stable ``code``.

Grouped by how the operator reacts::

    CoordinatorError              base; never raised itself
    +-- ConfigError               a command-line argument is unusable: fix it (exit status 2)
    |     codes: bad_address, address_in_use, bad_db, bad_state_dir, tls_unreadable,
    |            tls_invalid, bad_setting (admission, limits, retention: Settings),
    |            tokens_unreadable
    +-- KeyFileError              the signing key on disk is unsafe or unusable: fix it
    |     codes: key_missing, key_permissions, key_unreadable, key_unwritable, key_corrupt
    +-- JobError                  a submission or cancel refused: fix the request
    |     codes: unknown_node, unknown_job, job_exists, job_final, bad_job_id,
    |            bad_node_id, bad_ttl, bad_reason, bad_request, the artifact store's
    |            bad_token, token_expired, too_large, output_exists, output_expired,
    |            and a spec's refusal as a
    |            node would say it (sandbox.errors.SpecError: bad_spec, spec_too_large,
    |            unknown_field, missing_field, forbidden_field, bad_value)
    +-- AdminError                the admin API is unreachable or refused the client
    |     codes: admin_file_missing, admin_file_unsafe, admin_file_corrupt, admin_file_unwritable,
    |            bad_url, admin_unreachable, unauthorized, forbidden, bad_answer, wait_timeout,
    |            and the JobError codes the API answered with
    +-- GatewayError              the gateway refused a client's request, or the admin a key
    |     codes: invalid_api_key, rate_limited, model_not_found, no_ready_replica,
    |            replicas_busy, gateway_busy, bad_request, request_too_large,
    |            headers_too_large, request_timeout, upstream_error,
    |            upstream_timeout, response_too_large, not_found, method_not_allowed,
    |            unknown_key_id, bad_key_name, bad_rate, bad_peer (a request on the
    |            coordinators' own path without their proof)
    +-- StreamError               a tunnel stream to a node's service failed or was refused:
          another node may serve the request (if nothing of it was read yet)
          codes: no_tunnel (the node has no data connection), too_many_streams,
                 ids_exhausted (its connection's stream ids are used up: it reconnects),
                 bad_target, stream_ended (written after write_eof), peer_failed (the
                 coordinator holding the node's tunnel gave no stream), and every reset
                 code (agent.protocol.tunnel.ResetCode: cancel, unknown_target,
                 connect_failed, target_error, connection_lost, ...), or the
                 TunnelError code that closed the connection

Protocol errors with a peer are :mod:`agent.protocol.errors`; they go to the agent as an
``error`` message and never stop the coordinator.
"""

from __future__ import annotations

__all__ = [
    "AdminError",
    "ConfigError",
    "CoordinatorError",
    "GatewayError",
    "JobError",
    "KeyFileError",
    "StreamError",
]


class CoordinatorError(Exception):
    """Base of the coordinator's own errors; ``code`` is stable, ``detail`` is for humans."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class ConfigError(CoordinatorError):
    """An argument of ``gpu-coordinator`` is unusable; nothing was written."""


class KeyFileError(CoordinatorError):
    """The coordinator's signing key file is unsafe, unreadable or not a key."""


class JobError(CoordinatorError):
    """A job submission or cancel the coordinator refuses; nothing was stored or sent."""


class AdminError(CoordinatorError):
    """The admin API could not be reached, or answered with an error (a client's view)."""


class StreamError(CoordinatorError):
    """A tunnel stream could not be opened, or ended other than by the service's EOF."""


class GatewayError(CoordinatorError):
    """The gateway refuses a request (answered in OpenAI's error shape), or a key change."""

    def __init__(self, code: str, detail: str = "", *, retry_after_s: float | None = None) -> None:
        super().__init__(code, detail)
        self.retry_after_s = retry_after_s
        """When the client may try again (``Retry-After``); None: not said."""
