"""User-facing errors: reported as one line with exit status 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's arguments, configs, data files or machine.

    The launchers catch it, print ``error: <message>`` on one line and exit with status 2.
    """


def fail(message: str) -> UserError:
    """Build a :class:`UserError` (use as ``raise fail(...)``)."""
    return UserError(message)
