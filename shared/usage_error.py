"""The error for a value a person gave (a flag, a URL, a setting): light, so any module
can raise it, and the command lines print it on one line."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A value a person gave is wrong: a flag, a URL, a setting, a secret file's content.

    Commands print it on one line. It is a ValueError, so library callers that catch
    ValueError keep working; a plain ValueError from deeper down is a bug, and a command
    that lists only UsageError among its user errors shows its traceback.
    """
