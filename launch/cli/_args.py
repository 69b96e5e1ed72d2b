"""Argument helpers shared by the command modules: value types, path checks, one-line errors."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, TypeVar

from data.common import UserError

T = TypeVar("T")


class CliError(UserError, ValueError):
    """A command-line mistake (a missing path, flags that contradict each other); printed as one line."""


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (``pretrain search query: error: argument -k: ...``), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make an existing (sub-)parser report argument errors as one line."""
    parser.error = OneLineParser.error.__get__(parser)
    return parser


def positive_int(name: str) -> Callable[[str], int]:
    """argparse type: an integer >= 1 (``NAME must be a positive integer, got 'x'``)."""

    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got '{text}'") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got '{text}'")
        return v

    return parse


def positive(kind: type, name: str) -> Callable[[str], float]:
    """argparse type: a number of type ``kind`` > 0 (``NAME must be a positive int, got 'x'``)."""

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive {kind.__name__}, got '{text}'") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive {kind.__name__}, got '{text}'")
        return v

    return parse


def fraction(name: str) -> Callable[[str], float]:
    """argparse type: a number in (0, 1]."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not 0.0 < v <= 1.0:
            raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1], got '{text}'")
        return v

    return parse


def port(text: str) -> int:
    """argparse type: a TCP port."""
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"--port must be an integer in [0, 65535], got '{text}'")
    return v


def existing_dir(flag: str, path) -> Path:
    """``Path(path)``, or a :class:`CliError` naming the flag when it is not a directory."""
    p = Path(path)
    if not p.is_dir():
        raise CliError(f"{flag}: directory '{p}' does not exist")
    return p


def existing_file(flag: str, path) -> Path:
    """``Path(path)``, or a :class:`CliError` naming the flag when it is not a file."""
    p = Path(path)
    if not p.is_file():
        raise CliError(f"{flag}: file '{p}' does not exist")
    return p


def for_flag(flag: str, error: type, fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)``, with an ``error`` it raises re-raised as a :class:`CliError` that
    names the flag the bad value came from (``--heads: ...``)."""
    try:
        return fn(*args, **kwargs)
    except error as exc:
        raise CliError(f"{flag}: {exc}") from None
