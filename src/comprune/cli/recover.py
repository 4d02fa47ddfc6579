"""The recovery stages' flags on `comprune prune` (comprune.recover): --tune, --recover distill and their knobs."""
from __future__ import annotations

import argparse

from ..errors import CompruneError
from ..recover import DistillOptions, Recovery, TuneOptions
from ..recover.distill import LR


def add_recover_options(p, duration):
    g = p.add_argument_group("recovery stages after the prune (backward passes; off by default)")
    t, d = TuneOptions(), DistillOptions()
    g.add_argument("--tune", action="store_true",
                   help="end-to-end mask tuning: scales of the kept MLP neurons and attention heads trained against "
                        "the dense model's next-token KL, folded into down_proj/o_proj (no new parameters)")
    g.add_argument("--tune-train", default=None,
                   help=f"what trains, comma-separated: neurons, heads, channels (default {','.join(t.train)})")
    for name, kind, text in (("bound", float, "scales stay in [1-b, 1+b]; 0: unbounded"),
                             ("pull", float, "weight of the pull of the scales toward 1"),
                             ("steps", int, "optimiser steps at most"), ("lr", float, "Adam step size"),
                             ("batch", int, "windows per step"),
                             ("eval_every", int, "steps between held-out evaluations (and checkpoints)"),
                             ("tokens", int, "tokens trained on (0: the calibration windows; more: C4 windows beyond them)")):
        g.add_argument(f"--tune-{name.replace('_', '-')}", type=kind, default=None, help=f"{text} (default {getattr(t, name)})")
    g.add_argument("--tune-time", type=duration, default=None, help="time budget of the tuning, e.g. 90s (default none)")
    g.add_argument("--recover", default=None, choices=["distill"],
                   help="distill: knowledge distillation from the dense model through LoRA adapters (peft) on the "
                        "blocks' linear layers, merged at the end (same shapes)")
    g.add_argument("--recover-tokens", type=int, default=None, help=f"distillation tokens at most (default {d.tokens})")
    g.add_argument("--recover-time", type=duration, default=None, help="distillation time budget, e.g. 20m")
    g.add_argument("--recover-train", default=None, choices=["lora", "weights"],
                   help=f"what distillation trains: LoRA adapters merged at the end, or the linear layers' weights "
                        f"(default {d.train})")
    g.add_argument("--recover-rank", type=int, default=None, help=f"LoRA rank (default {d.rank})")
    g.add_argument("--recover-lr", type=float, default=None,
                   help=f"distillation learning rate (default {d.lr} for adapters, {LR['weights']} for weights)")
    g.add_argument("--recover-data", default=None,
                   help="what distillation trains on: a source or mix, e.g. self:0.5,c4:0.5 (default: the calibration "
                        "windows, then more C4 when calibrating on C4); never evaluation text")
    g.add_argument("--recover-seqlen", type=int, default=None,
                   help="window length distillation trains on (default: the calibration's)")
    g.add_argument("--recover-eval-every", type=int, default=None,
                   help=f"distillation steps between held-out evaluations and checkpoints (default {d.eval_every})")
    g.add_argument("--recover-heldout", type=int, default=None,
                   help="held-out windows the stages stop early on (default 16)")


def _given(args, prefix: str, names) -> dict:
    return {n: getattr(args, f"{prefix}_{n}") for n in names if getattr(args, f"{prefix}_{n}", None) is not None}


def recovery_from_args(args) -> Recovery | None:
    tune_knobs = _given(args, "tune", ("train", "bound", "pull", "steps", "lr", "batch", "eval_every", "tokens",
                                             "time"))
    distill_knobs = _given(args, "recover", ("tokens", "time", "train", "rank", "lr", "eval_every", "data", "seqlen"))
    if tune_knobs and not args.tune:
        raise CompruneError(f"--tune-{next(iter(tune_knobs))} sets the tuning stage: add --tune")
    if distill_knobs and args.recover != "distill":
        raise CompruneError(f"--recover-{next(iter(distill_knobs))} sets the distillation stage: add --recover distill")
    if not args.tune and args.recover is None:
        return None
    return Recovery(tune=TuneOptions(**tune_knobs) if args.tune else None,
                    distill=DistillOptions(**distill_knobs) if args.recover == "distill" else None,
                    **({"heldout": args.recover_heldout} if args.recover_heldout is not None else {}))


def refuse_streamed(args: argparse.Namespace):
    if args.tune or args.recover:
        raise CompruneError("--tune and --recover train against the whole dense model, which --stream never holds: "
                            "prune without --stream")
