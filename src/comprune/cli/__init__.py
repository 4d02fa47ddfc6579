"""`comprune prune|eval|export|compare`: a thin shell over the Python API."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import CompruneError
from . import compare, evaluate, export, prune


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (evaluate, prune, compare, export):  # the order of `comprune --help`
        command.add_command(sub)
    return parser


def _no_stdin():
    """comprune never reads stdin: nothing (e.g. transformers' remote-code y/N prompt) can be answered through it."""
    if getattr(sys.stdin, "name", None) == os.devnull:
        return
    try:
        sys.stdin = open(os.devnull)
    except OSError:
        sys.stdin = None


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _no_stdin()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CompruneError as e:
        print(f"comprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("comprune: interrupted", file=sys.stderr)
        return 130
