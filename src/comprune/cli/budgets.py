"""Budgets a user has instead of a ratio: a GGUF file size (--target-size) or a llama.cpp speedup on this
machine (--target-speedup). Each resolves to the ratio that meets it before any pruning, and is recorded,
with what it was derived from and what the pruned model reached, in pruning.json.

With the width search (`--preset comp-search`), `--ratio` and `--target-speedup` combine: the parameter budget
stays exact and the speedup becomes a constraint of the search (it removes as many whole blocks as the latency
table says the speed needs, and allocates the rest of the budget as neurons)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..errors import CompruneError
from ..export.gguf import pad_step
from ..budget.speed import ratio_for_speedup, speedup_blocks
from ..export.latency import latency_table
from ..export.size import gguf_bytes, parse_size, ratio_for_size
from ..io import MANIFEST, read_manifest, write_manifest
from ..models.adapters import get_adapter
from ..skeleton import build_skeleton
from ..stream import resolve_stream_source


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
    p.add_argument("--target-type", default="f16", choices=["f32", "f16", "q8_0"],
                   help="GGUF type of --target-size and --target-speedup (default f16; widths are rounded to the export's "
                        "multiple of 32)")


def _combined(args, cfg) -> bool:
    return args.ratio is not None and args.target_speedup is not None and args.target_size is None and \
        cfg.width_allocation == "search"


def _source(args, flag: str, cfg=None) -> Path:
    given = [f for f, v in (("--ratio", args.ratio), ("--target-size", args.target_size),
                            ("--target-speedup", args.target_speedup)) if v is not None]
    if len(given) > 1 and not (cfg is not None and _combined(args, cfg)):
        if "--ratio" in given and "--target-speedup" in given:
            raise CompruneError("--ratio with --target-speedup is a constraint of the width search: add --preset "
                                "comp-search, or give only one of them")
        raise CompruneError(f"give one of {', '.join(given)}, not several (each decides the ratio)")
    try:
        return resolve_stream_source(args.model)
    except CompruneError:
        raise CompruneError(f"{flag} needs a model directory of safetensors (or 'smollm2'), not '{args.model}': "
                            "convert it first, or give --ratio") from None


def resolve_budget(args, cfg) -> dict | None:
    """Set cfg.ratio from --target-size or --target-speedup; the budget's record, or None without either."""
    if args.target_size is None and args.target_speedup is None:
        return None
    flag = "--target-size" if args.target_size is not None else "--target-speedup"
    src = _source(args, flag, cfg)
    # the export pads every width with zero neurons to its step: a size budget counts the bytes as written, and a
    # speed budget would pay for zeros that run at the rounded-up width's speed, so both round to that step
    step = pad_step(args.target_type)
    if cfg.round_to % step:
        cfg.round_to = math.lcm(cfg.round_to, step)
    if args.target_size is not None:
        budget = {"kind": "target_size",
                  **ratio_for_size(src, parse_size(args.target_size), args.target_type, cfg.ratio_of, cfg.round_to)}
    elif _combined(args, cfg):
        table = latency_table(src, args.target_type, threads=torch.get_num_threads(), show=not args.json)
        cfg.search_speedup, cfg.latency = args.target_speedup, {k: table[k] for k in ("c", "a", "m")}
        skeleton = build_skeleton(src, torch.float32, lite=True)
        k, pred = speedup_blocks(skeleton, get_adapter(skeleton), cfg)  # refuses an unreachable target now
        budget = {"kind": "target_speedup", "ratio": cfg.ratio, "with_ratio": True, "target": args.target_speedup,
                  "min_removed_blocks": k, "predicted_at_minimum": pred, "qtype": args.target_type,
                  "table": {k_: table[k_] for k_ in ("c", "a", "m", "cpu", "threads")}}
    else:
        table = latency_table(src, args.target_type, threads=torch.get_num_threads(), show=not args.json)
        skeleton = build_skeleton(src, torch.float32, lite=True)  # shapes only: the plan needs no weights
        budget = {"kind": "target_speedup",
                  **ratio_for_speedup(skeleton, get_adapter(skeleton), cfg, table, args.target_speedup)}
    cfg.ratio = budget["ratio"]
    cfg.validate()
    return budget


def finish_budget(out: Path, budget: dict | None):
    """Record the budget and what the pruned model reached in pruning.json; a size over its target is refused
    (the margin should prevent it)."""
    if budget is None:
        return
    if budget["kind"] == "target_size":
        got = gguf_bytes(out, budget["qtype"])
        budget = {**budget, "gguf_bytes": got, "met": got <= budget["requested_bytes"]}
    manifest = read_manifest(out)
    if budget.get("with_ratio"):  # what the search's allocation is predicted to reach
        budget = {**budget, "predicted": manifest.get("details", {}).get("search", {}).get("speedup", {}).get(
            "predicted", budget["predicted_at_minimum"])}
    manifest[budget["kind"]] = budget
    tmp = out / (MANIFEST + ".tmp")
    write_manifest(tmp, manifest)
    os.replace(tmp, out / MANIFEST)
    if budget["kind"] == "target_size" and not budget["met"]:
        raise CompruneError(f"the pruned model's {budget['qtype']} GGUF is {got / 1e6:.2f} MB, over --target-size "
                            f"{budget['requested_bytes'] / 1e6:.2f} MB: rerun with --ratio "
                            f"{budget['ratio'] * got / budget['requested_bytes']:.4f} (and report this)")


def budget_record(out: Path, budget: dict | None) -> dict:
    return {budget["kind"]: read_manifest(out)[budget["kind"]]} if budget else {}


def print_budget(out: Path, budget: dict | None):
    if not budget:
        return
    t = read_manifest(out)[budget["kind"]]
    if budget["kind"] == "target_size":
        print(f"GGUF {t['qtype']}: {t['gguf_bytes'] / 1e6:.2f} MB (target {t['requested_bytes'] / 1e6:.2f} MB, dense "
              f"{t['dense_gguf_bytes'] / 1e6:.2f} MB, ratio {t['ratio']:.4f})")
    else:
        print(f"llama.cpp generation: {t['predicted']:.2f}x dense predicted (target {t['target']:.2f}x, ratio "
              f"{t['ratio']:.4f}; measure it: comprune compare, or benchmarks/gguf_speed.py)")
