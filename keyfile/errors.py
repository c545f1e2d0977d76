"""The key file library's one error.

KeyFileError    a key file is unsafe or unusable; the caller says whose key it is
    codes: key_permissions (a symlink, not a regular file or directory, another
           user's, open to group or others), key_unreadable, key_unwritable,
           key_corrupt (larger than any key)
"""

from __future__ import annotations

__all__ = ["KeyFileError"]


class KeyFileError(Exception):
    """A key file is unsafe or unusable; ``code`` is stable, ``detail`` is for humans."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail
