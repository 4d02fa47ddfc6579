"""comprune prune: prune a model and save it, in memory or streamed from its shards (--stream)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
from pathlib import Path

from .. import distributed
from ..card import read_recipe
from ..checkpoint import checkpoint_dir, resumed_precision
from .. import registry
from ..config import PRESETS, PruneConfig
from ..data import get_calibration
from ..devices import resolve_device
from ..errors import CompruneError
from ..io import save_pretrained
from ..loading import load
from ..precision import Choice
from ..outputs import check_output, guard_output, json_text
from ..prune import prune
from ..stream import prune_streaming
from .budgets import add_budget_options, budget_record, finish_budget, print_budget, resolve_budget
from .format import add_common, table
from .recover import add_recover_options, recovery_from_args, refuse_streamed


# argparse dest -> PruneConfig run setting, for the options a preset can set (None = not given on the command line);
# a method's own options are made from its registered dataclass (add_method_options)
_RUN = {"ratio": "ratio", "method": "method", "nsamples": "nsamples", "seqlen": "seqlen", "calib": "calib",
        "seed": "seed", "calib_batch_size": "batch_size", "round_to": "round_to", "head_share": "head_share",
        "head_unit": "head_unit", "expert_share": "expert_share", "layer_share": "layer_share", "ratio_of": "ratio_of"}


def duration(text: str) -> float:
    """Seconds from '90', '90s', '20m' or '1.5h' (argparse type)."""
    t = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration: use e.g. 90s, 20m or 1.5h") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite duration: use e.g. 90s, 20m or 1.5h")
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}': a duration cannot be negative")
    return value


_PARSERS = {"str": str, "int": int, "float": float, "duration": duration}


def _option_fields() -> dict:
    """Every registered method's options, by name: (field, [methods declaring it])."""
    found = {}
    for method in registry.methods().values():
        for f in dataclasses.fields(method.options):
            if f.metadata.get("cli", True):
                found.setdefault(f.name, (f, []))[1].append(method.name)
    return found


def add_method_options(p):
    """One flag per field of every registered method's options dataclass (help, choices and default from it)."""
    groups = {}
    for name, (f, owners) in _option_fields().items():
        label = "/".join(owners)
        group = groups.setdefault(label, p.add_argument_group(f"{label} options"))
        flag = "--" + name.replace("_", "-")
        default = f"default {f.default}"
        if str(f.type).startswith("bool"):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{f.metadata.get('help', '')} ({default})")
            continue
        kind = f.metadata.get("kind") or str(f.type).split("|")[0].strip()
        group.add_argument(flag, dest=name, type=_PARSERS[kind], default=None, choices=f.metadata.get("choices"),
                           help=f"{f.metadata.get('help', '')} ({default})")


def _config_from_args(args):
    given = {field: getattr(args, dest) for dest, field in _RUN.items() if getattr(args, dest, None) is not None}
    given.update({name: getattr(args, name) for name in _option_fields() if getattr(args, name, None) is not None})
    given["device"] = args.device
    recipe = getattr(args, "recipe_record", None)
    if recipe is not None:  # the recipe's settings, the options given on the command line on top
        base = recipe["config"]
        if given.get("method", base.get("method")) != base.get("method"):  # another method: its own defaults
            base = {k: v for k, v in base.items() if k in PruneConfig().run_settings()}
        return PruneConfig(**{**base, **given})
    return PruneConfig.from_preset(args.preset, **given) if args.preset else PruneConfig(**given)


def _apply_recipe(args):
    """--recipe FILE: the model, precision and streaming of the recorded run, unless given on the command line."""
    args.recipe_record = None
    if not getattr(args, "recipe", None):
        if not args.model:
            raise CompruneError("no model given: pass MODEL ('smollm2', a directory, a .gguf file or a hub id) "
                                "or --recipe recipe.json")
        return
    if args.preset:
        raise CompruneError("--recipe and --preset both give every setting: pass one of them")
    rec = args.recipe_record = read_recipe(args.recipe)
    args.model = args.model or rec.get("model")
    if not args.model:
        raise CompruneError(f"the recipe {args.recipe} names no model: pass it, e.g. comprune prune MODEL "
                            f"--recipe {args.recipe} --out OUT")
    if args.dtype == "auto" and rec.get("dtype"):
        args.dtype = rec["dtype"]
    if args.save_dtype == "source" and rec.get("save_dtype"):
        args.save_dtype = rec["save_dtype"]
    args.stream = args.stream or bool(rec.get("stream"))


def _check_recipe_calibration(args, calib):
    """The recipe's calibration data, or a clear refusal: other data would prune another model."""
    want = (args.recipe_record or {}).get("calibration_sha256")
    got = calib.describe()["sha256"]
    if want and got != want:
        raise CompruneError(f"the calibration data differs from the recipe's (sha256 {got[:12]}... against "
                            f"{want[:12]}...): pass the --data-dir the recipe's run read, or the same --calib file")


def _refuse_stale_checkpoint(out: Path, args):
    ckpt_dir = checkpoint_dir(out)
    if any((ckpt_dir / name).exists() for name in ("state.json", "run.json")) and not (args.resume or args.force):
        raise CompruneError(f"an interrupted run left a checkpoint in {ckpt_dir}: pass --resume to continue it "
                            "or --force to start over")


def _dtype(args, out: Path):
    """--dtype, except that a resume under auto computes in the precision the interrupted run chose, as it chose
    it (the same record in pruning.json)."""
    if args.resume and args.dtype == "auto":
        rec = resumed_precision(checkpoint_dir(out))
        if rec is not None:
            return Choice(**{f.name: rec[f.name] for f in dataclasses.fields(Choice) if f.name in rec})
    return args.dtype


def cmd_prune_stream(args, cfg) -> int:
    """comprune prune DIR --stream: the same prune, one decoder block in memory at a time (comprune.stream)."""
    out = check_output(Path(args.out), args.force)
    cfg, size = resolve_budget(args, cfg)
    with guard_output(out, resume=args.resume, before=lambda: _refuse_stale_checkpoint(out, args)):
        report = prune_streaming(args.model, out, cfg, resume=args.resume, force=args.force, progress=not args.json,
                                 dtype=_dtype(args, out), save_dtype=args.save_dtype, base_model=args.model,
                                 trust_remote_code=args.trust_remote_code,
                                 data_dir=args.data_dir,
                                 lite=not getattr(args, "stream_transformers_modules", False))
    want = (args.recipe_record or {}).get("calibration_sha256")
    if want and report.calibration.get("sha256") != want:  # read in a child process: known only now
        print(f"warning: the calibration data differs from the recipe's (sha256 {report.calibration['sha256'][:12]}"
              f"... against {want[:12]}...): {out} is another model than the recipe's", file=sys.stderr)
    finish_budget(out, size)
    if args.json:
        print(json_text({"out": str(out), **{k: v for k, v in report.to_dict().items() if k != "blocks"},
                          **budget_record(out, size)}, indent=2))
    else:
        print(table(report.summary_rows(), list(report.summary_rows()[0])))
        print(f"removed layers: {report.removed_layers or 'none'}; saved to {out} (streamed)")
        print_budget(out, size)
    return 0


def cmd_prune(args) -> int:
    _apply_recipe(args)
    if getattr(args, "stream", False):
        if distributed.init():
            raise CompruneError("--stream runs in one process: drop --stream or run without torchrun")
        refuse_streamed(args)
        return cmd_prune_stream(args, _config_from_args(args))
    cfg = _config_from_args(args)
    recovery = recovery_from_args(args)
    if distributed.init(resolve_device(cfg.device)):
        if not distributed.is_writer():
            return _prune_rank(args, recovery)
    out = check_output(Path(args.out), args.force)  # fail before any work, and never leave a half-written directory
    cfg, size = resolve_budget(args, cfg)
    cfg = distributed.decided(cfg)  # the other ranks take the resolved config (_prune_rank)
    ckpt_dir = checkpoint_dir(out)
    with guard_output(out, resume=args.resume, before=lambda: _refuse_stale_checkpoint(out, args)):
        model, tok = load(args.model, dtype=_dtype(args, out), device="cpu", trust_remote_code=args.trust_remote_code,
                          allow_pickle=args.allow_pickle, compute_device=cfg.device)
        calib = get_calibration(tok, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed, data_dir=args.data_dir,
                                heldout=cfg.heldout_windows, model=model, progress=not args.json)
        _check_recipe_calibration(args, calib)
        model, report = prune(model, tok, cfg, calibration=calib, progress=not args.json, base_model=args.model,
                              checkpoint_dir=ckpt_dir, resume=args.resume, target=size, recovery=recovery)
        save_pretrained(model, tok, out, report, force=args.force, dtype=args.save_dtype)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    finish_budget(out, size)
    if args.json:
        print(json_text({"out": str(out), **{k: v for k, v in report.to_dict().items() if k != "blocks"},
                          **budget_record(out, size)}, indent=2))
    else:
        print(table(report.summary_rows(), list(report.summary_rows()[0])))
        print(f"removed layers: {report.removed_layers or 'none'}; saved to {out}")
        for st in report.stages:
            print(f"{st['stage']}: held-out KL {st['kl_before']:.4f} -> {st['kl_after']:.4f} in {st['steps']} steps "
                  f"({st['tokens']} tokens, {st['seconds']:.0f} s; stopped: {st['stopped']})")
        print_budget(out, size)
    return 0


def _prune_rank(args, recovery=None) -> int:
    """A rank other than 0 under torchrun (comprune.distributed): the same prune on its share of the windows, with
    rank 0's resolved config and the same recovery stages (on its part of their windows); rank 0 alone checks and
    writes the output (and the checkpoint's shared state)."""
    cfg = distributed.decided(None)
    out = Path(args.out)
    model, tok = load(args.model, dtype=_dtype(args, out), device="cpu", trust_remote_code=args.trust_remote_code,
                      allow_pickle=args.allow_pickle, compute_device=cfg.device)
    calib = get_calibration(tok, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed, data_dir=args.data_dir,
                            heldout=cfg.heldout_windows)
    prune(model, tok, cfg, calibration=calib, progress=False, base_model=args.model,
          checkpoint_dir=checkpoint_dir(out), resume=args.resume, recovery=recovery)
    return 0


def add_command(sub):
    d = PruneConfig()
    p = sub.add_parser("prune", help="prune a model and save it (safetensors + pruning.json)")
    p.add_argument("model", nargs="?", default=None,
                   help="'smollm2', a model directory, a .gguf file or a hub id (default with --recipe: its model)")
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --force)")
    p.add_argument("--recipe", default=None,
                   help="recipe.json written beside a pruned model (or that model's directory): prune again with its "
                        "model, every setting, precision and calibration (checked by sha256); options given here "
                        "override it")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished block")
    p.add_argument("--stream", action="store_true",
                   help="prune from the safetensors shards one block at a time, never holding the whole model "
                        "(model: a directory or 'smollm2'; docs/streaming.md)")
    p.add_argument("--stream-transformers-modules", action="store_true",
                   help="with --stream: use transformers' model classes instead of comprune's plain-PyTorch "
                        "Llama-family modules (same result, ~0.05-0.1 GB more memory)")
    p.add_argument("--ratio", type=float, default=None, help="fraction of all parameters to remove (default 0.2)")
    add_budget_options(p)
    p.add_argument("--ratio-of", default=None, choices=["all", "blocks"],
                   help="what --ratio is a fraction of: all parameters (default) or the decoder blocks' only "
                        "(embeddings and LM head excluded, as Týr's tables; for embedding-heavy models like Gemma 3)")
    p.add_argument("--method", default=None, choices=registry.names(),
                   help="; ".join(f"{m.name}: {m.help}" for m in registry.methods().values()) + f" (default {d.method})")
    p.add_argument("--layer-share", type=float, default=None,
                   help=f"fraction of the removed parameters taken by whole layers (default {d.layer_share})")
    p.add_argument("--calib", default=None, help="calibration text: c4 (default), wikitext2-validation, a file, self (text the dense model "
                        "writes: its chat answers, or continuations for a base model), or a mix such as "
                        "self:0.5,c4:0.5 (shares of the windows)")
    p.add_argument("--nsamples", type=int, default=None, help=f"calibration windows (default {d.nsamples})")
    p.add_argument("--seqlen", type=int, default=None, help=f"tokens per window (default {d.seqlen})")
    p.add_argument("--seed", type=int, default=None, help=f"default {d.seed}")
    p.add_argument("--calib-batch-size", type=int, default=None, help=f"default {d.batch_size}")
    p.add_argument("--round-to", type=int, default=None, help="round kept MLP widths to a multiple of N")
    p.add_argument("--head-share", type=float, default=None,
                   help="COMP: fraction of the non-layer budget taken from attention (query heads, as many from every "
                        "KV group, o_proj refitted; or whole KV groups with --head-unit kv); 0 = MLP neurons only")
    p.add_argument("--expert-share", type=float, default=None,
                   help=f"mixture-of-experts models: fraction of the MLP budget taken by whole experts, the rest by "
                        f"neurons inside the kept experts (default {d.expert_share})")
    p.add_argument("--head-unit", default=None, choices=["query", "kv"], help=f"default {d.head_unit}")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="start from a named configuration; explicit options override it (comp-spec: the literal "
                        "method spec: condition score, per-neuron scales)")
    p.add_argument("--save-dtype", default="source", choices=["source", "compute", "float32", "float16", "bfloat16"],
                   help="precision of the saved weights: source (default: the precision the model was stored in), "
                        "compute (the --dtype that ran), or a dtype")
    add_method_options(p)
    add_recover_options(p, duration)
    add_common(p)
    p.set_defaults(func=cmd_prune)
