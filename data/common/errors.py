"""Errors caused by what the user gave: a bad config key, a missing file, a bad flag.

Code that reports bad input raises a :class:`UserError` (or a subclass). The ``pretrain`` command
prints these as one line, ``pretrain <command>: error: <message>``, and exits with code 2; any
other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["UserError", "PathNotFoundError"]


class UserError(Exception):
    """Base of every error caused by the user's input; the message says what is wrong and how to fix it."""


class PathNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist or is not what was expected (a run
    directory without its files, a missing checkpoint). Still a :class:`FileNotFoundError`."""

    def __init__(self, message: str):
        # one argument only: OSError would read two as (errno, strerror)
        super().__init__(message)
