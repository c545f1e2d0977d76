"""Errors of the agent daemon.

Every error carries a stable ``code`` that can travel to a coordinator, and is grouped by
how a caller reacts to it::

    AgentError                     base; never raised itself
    +-- IdentityError              the node key cannot be trusted or used (refuse to start)
    |     codes: key_permissions, key_unreadable, key_unwritable, key_corrupt,
    |            key_missing (read only: `keys show` before the first start)
    +-- ConfigError                a setting is wrong (refuse to start, say which)
    |     codes: bad_config; bad_policy (a `--policy` file)
    +-- OutboxError                the durable outbox refused or failed an operation
    |     codes: ack_ahead, seq_backwards, bad_argument, schema_too_new, closed,
    |            storage_error
    +-- ControlError               a local control API request or socket failed
    |     codes: see agent.control.wire (``fix`` says what the user can do, when known)
    +-- JobStateError              a job was to move where its state machine does not go
    |     codes: bad_transition
    +-- InputError                 an input given by URL could not be had (the job ends
    |     before it starts, ``error`` with the code)
    |     codes: input_digest_mismatch, input_too_large, input_unreachable,
    |            input_timeout, input_not_found, input_http_error,
    |            input_redirect_refused, input_scheme_refused, input_cache_full,
    |            input_cache_error (the cache's directory failed), disk_full
    +-- UploadError                an output could not be delivered to its target (the job
          ends ``error``, code ``upload_failed``, the detail starting with one of these)
          codes: upload_failed (retries spent; the detail says the last cause),
                 upload_refused (a 4xx other than 408/429: retrying cannot help),
                 output_changed (the spooled file is not what was hashed)
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "ConfigError",
    "ControlError",
    "IdentityError",
    "InputError",
    "JobStateError",
    "OutboxError",
    "UploadError",
]


class AgentError(Exception):
    """Base of every agent error; ``code`` is stable, ``detail`` is for humans."""

    code: str = "agent_error"

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class IdentityError(AgentError):
    """The node's key file is unsafe, unreadable, unwritable or not a key."""


class ConfigError(AgentError):
    """An agent setting is invalid."""


class OutboxError(AgentError):
    """An outbox operation refused or failed; ``code`` is stable, ``detail`` is for humans.

    Codes: ``ack_ahead`` (an ack beyond the last appended seq), ``seq_backwards`` (the
    coordinator seq moved back), ``bad_argument``, ``schema_too_new`` (the file was written
    by a newer agent), ``closed``, ``storage_error`` (SQLite failed: disk, permission,
    corruption).
    """


class ControlError(AgentError):
    """A control API request or the control socket failed; ``fix`` is the remedy, if known."""

    def __init__(self, code: str, detail: str = "", fix: str = "") -> None:
        super().__init__(code, detail)
        self.fix = fix


class JobStateError(AgentError):
    """A job was to make a move :data:`agent.jobs.machine.TRANSITIONS` does not hold
    (``bad_transition``): a bug, never something the coordinator can cause."""


class InputError(AgentError):
    """An input given by URL could not be fetched, checked or cached; see the codes above."""


class UploadError(AgentError):
    """A job's output could not be PUT to its target."""
