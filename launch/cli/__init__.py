"""The ``pretrain`` command: fit, probe, demo, export, list, finetune, distill, embed and search.

The command modules (:mod:`.train`, :mod:`.finetune`, :mod:`.search`) only parse arguments, call
library functions and print. :func:`main` turns a :class:`~data.common.UserError` (bad input:
config keys, paths, flags, unknown names) into one line on stderr and exit code 2, and Ctrl-C into
exit code 130; every other exception is a bug and propagates with its traceback.
"""
from __future__ import annotations

import argparse
import sys

from data.common import UserError

from . import finetune, search, train
from ._args import CliError

__all__ = ["main", "build_parser", "CliError"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain", description="Self-supervised pretraining on shared backbones: "
                                "train (fit), evaluate frozen features (probe), or run the demo.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    train.add_parsers(sub)  # fit, probe, demo, export, list
    finetune.add_parsers(sub)  # finetune, distill
    search.add_parsers(sub)  # embed, search {build, query, eval, caption, align, queries, serve}
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (argument errors exit 2 through argparse)."""
    args = build_parser().parse_args(argv)
    name = getattr(args, "label", args.command)  # e.g. "search build"
    try:
        return args.fn(args)
    except UserError as exc:
        print(f"pretrain {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pretrain {name}: interrupted", file=sys.stderr)
        return 130
