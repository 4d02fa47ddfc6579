"""The budget options of `comprune prune`: --target-size and --target-speedup (comprune.budget.targets resolves
them; docs/budgets.md)."""
from __future__ import annotations

from pathlib import Path

from ..budget.targets import describe, finish, resolve
from ..errors import CompruneError
from ..export.gguf import QTYPES
from ..io import read_manifest


def add_budget_options(p):
    p.add_argument("--target-size", default=None,
                   help="instead of --ratio: the largest GGUF file the pruned model may make at --target-type, "
                        "e.g. 80MB or 75MiB (the ratio is derived exactly from the export's layout; the real size "
                        "is checked and recorded in pruning.json)")
    p.add_argument("--target-speedup", type=float, default=None,
                   help="instead of --ratio: llama.cpp generation this many times faster than the dense model on "
                        "this machine (e.g. 1.5), from a latency table timed once per model, machine, type and "
                        "thread count (cached; docs/budgets.md); with --preset comp-search and --ratio, a constraint of the "
                        "width search at that exact size instead")
    p.add_argument("--target-type", default="f16", choices=list(QTYPES),
                   help="GGUF type of --target-size and --target-speedup (default f16; widths are rounded to the export's "
                        "multiple of 32)")


def _combined(args, cfg) -> bool:
    return args.ratio is not None and args.target_speedup is not None and args.target_size is None and \
        getattr(cfg, "width_allocation", None) == "search"


def resolve_budget(args, cfg) -> tuple:
    """(configuration to prune with, the target's record or None without --target-size or --target-speedup)."""
    if args.target_size is None and args.target_speedup is None:
        return cfg, None
    given = [f for f, v in (("--ratio", args.ratio), ("--target-size", args.target_size),
                            ("--target-speedup", args.target_speedup)) if v is not None]
    combined = _combined(args, cfg)
    if len(given) > 1 and not combined:
        if "--ratio" in given and "--target-speedup" in given:
            raise CompruneError("--ratio with --target-speedup is a constraint of the width search: add --preset "
                                "comp-search, or give only one of them")
        raise CompruneError(f"give one of {', '.join(given)}, not several (each decides the ratio)")
    return resolve(args.model, cfg, target_size=args.target_size, target_speedup=args.target_speedup,
                   target_type=args.target_type, with_ratio=combined, show=not args.json)


finish_budget = finish


def budget_record(out: Path, budget: dict | None) -> dict:
    return {budget["kind"]: read_manifest(out)[budget["kind"]]} if budget else {}


def print_budget(out: Path, budget: dict | None):
    if budget:
        print(describe(read_manifest(out)[budget["kind"]]))
