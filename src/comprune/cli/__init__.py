"""`comprune prune|eval|export|compare|plan`: a thin shell over the Python API."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import CompruneError
from ..outputs import json_text
from . import compare, evaluate, export, plan, prune


class UsageError(Exception):
    """argparse's own error (a bad choice, a value of the wrong type, a missing argument), raised instead of
    exiting so that main can answer --json with a JSON object too."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog, self.message = prog, message


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        raise UsageError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="comprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (evaluate, prune, compare, export, plan):  # the order of `comprune --help`
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


def _wants_json(argv: list[str]) -> bool:
    """--json among the options (argparse also takes an unambiguous prefix such as --js), read before parsing:
    an argument error must be answered in JSON too."""
    options = argv[:argv.index("--")] if "--" in argv else argv
    return any(a.startswith("--j") and "--json".startswith(a) for a in options)


def _json_error(message: str, fix: str | None = None):
    """The one JSON object of a failed --json run: comprune's "problem: fix" split at the first ": "."""
    if fix is None:
        error, _, fix = message.partition(": ")
    else:
        error = message
    print(json_text({"error": error, "fix": fix}), flush=True)


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _no_stdin()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    as_json = _wants_json(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"{e.prog}: error: {e.message}", file=sys.stderr)
        if as_json:
            _json_error(e.message, f"see `{e.prog} --help`")
        return 2
    try:
        return args.func(args)
    except CompruneError as e:
        print(f"comprune: error: {e}", file=sys.stderr)
        if as_json:
            _json_error(str(e))
        return 2
    except KeyboardInterrupt:
        print("comprune: interrupted", file=sys.stderr)
        if as_json:
            _json_error("interrupted", "run the command again (a prune continues with --resume)")
        return 130
    except Exception as e:
        if as_json:  # a bug: still one JSON object on stdout, and the traceback on stderr
            _json_error(f"internal error ({e.__class__.__name__}: {e})", "report this with the traceback")
        raise
