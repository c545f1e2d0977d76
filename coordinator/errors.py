"""Errors of the reference coordinator, each with a stable ``code``.

Grouped by how the operator reacts::

    CoordinatorError              base; never raised itself
    +-- KeyFileError              the signing key on disk is unsafe or unusable: fix it
          codes: key_permissions, key_unreadable, key_unwritable, key_corrupt

Protocol errors with a peer are :mod:`agent.protocol.errors`; they go to the agent as an
``error`` message and never stop the coordinator.
"""

from __future__ import annotations

__all__ = ["CoordinatorError", "KeyFileError"]


class CoordinatorError(Exception):
    """Base of the coordinator's own errors; ``code`` is stable, ``detail`` is for humans."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class KeyFileError(CoordinatorError):
    """The coordinator's signing key file is unsafe, unreadable or not a key."""
