"""User-facing errors: reported as one line with exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import re
from typing import NoReturn


class UserError(Exception):
    """A problem with the caller's arguments, configs, data files or machine: the
    library's exception, worded for any caller. Options are named as their config fields
    in backticks (```sparse_rank` 0 must be > 0``).

    The launchers catch it and print ``error: <message>`` on one line, those names as the
    flags that set them (:func:`cli_message`), and exit with status 2.
    """


def fail(message: str) -> UserError:
    """Build a :class:`UserError` (use as ``raise fail(...)``)."""
    return UserError(message)


_OPTION = re.compile(r"`([a-z][a-z0-9_]*)`")


def cli_message(exc: BaseException) -> str:
    """``exc``'s message for a command line: an option named in backticks becomes the
    flag that sets it (```sparse_rank``` -> ``--sparse_rank``)."""
    return _OPTION.sub(r"--\1", str(exc))


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``error: ...`` line with exit status 2."""

    def error(self, message: str) -> NoReturn:
        """One line and exit status 2 (no usage dump)."""
        self.exit(2, f"error: {message}\n")
