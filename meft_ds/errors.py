"""User-facing errors: reported as one line with exit status 2, never a traceback."""

from __future__ import annotations

import argparse
from typing import NoReturn


class UserError(Exception):
    """A problem with the user's arguments, configs, data files or machine.

    The launchers catch it, print ``error: <message>`` on one line and exit with status 2.
    """


def fail(message: str) -> UserError:
    """Build a :class:`UserError` (use as ``raise fail(...)``)."""
    return UserError(message)


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``error: ...`` line with exit status 2."""

    def error(self, message: str) -> NoReturn:
        """One line and exit status 2 (no usage dump)."""
        self.exit(2, f"error: {message}\n")
