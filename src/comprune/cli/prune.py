"""comprune prune: prune a model and save it, in memory or streamed from its shards (--stream)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..checkpoint import checkpoint_dir
from ..config import LAYER_SCORES, METHODS, NEURON_METRICS, WIDTH_ALLOCATIONS, PruneConfig
from ..data import get_calibration
from ..errors import CompruneError
from ..io import check_target, save_pretrained
from ..loading import load
from ..prune import prune
from ..stream import prune_streaming
from .format import add_common, table


def _config_from_args(args):
    cfg = PruneConfig(ratio=args.ratio, method=args.method, nsamples=args.nsamples, seqlen=args.seqlen,
                      calib=args.calib, seed=args.seed, device=args.device, batch_size=args.calib_batch_size,
                      metric=args.metric, layer_score=args.layer_score, mask_tuning=not args.no_mask_tuning,
                      round_to=args.round_to, damp=args.damp, ridge=args.ridge, recovery=args.recovery,
                      width_allocation=args.width_allocation, head_share=args.head_share)
    if args.layer_share is not None:
        cfg.layer_share = args.layer_share
    return cfg.validate()


def cmd_prune_stream(args, cfg) -> int:
    """comprune prune DIR --stream: the same prune, one decoder block in memory at a time (comprune.stream)."""
    out = Path(args.out)
    check_target(out, args.force)
    if (checkpoint_dir(out) / "state.json").exists() and not (args.resume or args.force):
        raise CompruneError(f"an interrupted run left a checkpoint in {checkpoint_dir(out)}: pass --resume to "
                            "continue it or --force to start over")
    report = prune_streaming(args.model, out, cfg, resume=args.resume, force=args.force, progress=not args.json,
                             dtype=args.dtype, base_model=args.model, trust_remote_code=args.trust_remote_code,
                             data_dir=args.data_dir, lite=not getattr(args, "stream_transformers_modules", False))
    if args.json:
        print(json.dumps({"out": str(out), **{k: v for k, v in report.to_dict().items() if k != "blocks"}}, indent=2))
    else:
        print(table(report.summary_rows(), list(report.summary_rows()[0])))
        print(f"removed layers: {report.removed_layers or 'none'}; saved to {out} (streamed)")
    return 0


def cmd_prune(args) -> int:
    if getattr(args, "stream", False):
        return cmd_prune_stream(args, _config_from_args(args))
    cfg = _config_from_args(args)
    out = Path(args.out)
    check_target(out, args.force)  # fail before any work, and never leave a half-written directory
    ckpt_dir = checkpoint_dir(out)
    if (ckpt_dir / "state.json").exists() and not (args.resume or args.force):
        raise CompruneError(f"an interrupted run left a checkpoint in {ckpt_dir}: pass --resume to continue it "
                            "or --force to start over")
    model, tok = load(args.model, dtype=args.dtype, device="cpu", trust_remote_code=args.trust_remote_code)
    calib = get_calibration(tok, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed, data_dir=args.data_dir)
    model, report = prune(model, tok, cfg, calibration=calib, progress=not args.json, base_model=args.model,
                          checkpoint_dir=ckpt_dir, resume=args.resume)
    save_pretrained(model, tok, out, report, force=args.force)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    if args.json:
        print(json.dumps({"out": str(out), **{k: v for k, v in report.to_dict().items() if k != "blocks"}}, indent=2))
    else:
        print(table(report.summary_rows(), list(report.summary_rows()[0])))
        print(f"removed layers: {report.removed_layers or 'none'}; saved to {out}")
    return 0


def add_command(sub):
    d = PruneConfig()
    p = sub.add_parser("prune", help="prune a model and save it (safetensors + pruning.json)")
    p.add_argument("model", help="'smollm2', a model directory, a .gguf file or a hub id")
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished block")
    p.add_argument("--stream", action="store_true",
                   help="prune from the safetensors shards one block at a time, never holding the whole model "
                        "(model: a directory or 'smollm2'; docs/streaming.md)")
    p.add_argument("--stream-transformers-modules", action="store_true",
                   help="with --stream: use transformers' model classes instead of comprune's plain-PyTorch "
                        "Llama-family modules (same result, ~0.05-0.1 GB more memory)")
    p.add_argument("--ratio", type=float, default=d.ratio, help="fraction of all parameters to remove (default 0.2)")
    p.add_argument("--method", default=d.method, choices=METHODS)
    p.add_argument("--layer-share", type=float, default=None,
                   help=f"fraction of the removed parameters taken by whole layers (default {d.layer_share})")
    p.add_argument("--calib", default=d.calib, help="calibration text: c4 (default), wikitext2-validation, or a file")
    p.add_argument("--nsamples", type=int, default=d.nsamples)
    p.add_argument("--seqlen", type=int, default=d.seqlen)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--calib-batch-size", type=int, default=d.batch_size)
    p.add_argument("--metric", default=d.metric, choices=NEURON_METRICS, help="neuron importance (COMP: condition)")
    p.add_argument("--layer-score", default=d.layer_score, choices=LAYER_SCORES)
    p.add_argument("--no-mask-tuning", action="store_true", help="skip COMP's least-squares scale recovery")
    p.add_argument("--recovery", default=d.recovery, choices=["scales", "least-squares"],
                   help="scales: COMP's mask tuning (default); least-squares: refit the kept down_proj columns")
    p.add_argument("--round-to", type=int, default=d.round_to, help="round kept MLP widths to a multiple of N")
    p.add_argument("--head-share", type=float, default=d.head_share,
                   help="COMP: fraction of the non-layer budget taken as whole attention KV groups (GQA-aware, "
                        "per-head scales into o_proj); 0 = MLP neurons only")
    p.add_argument("--width-allocation", default=d.width_allocation, choices=WIDTH_ALLOCATIONS,
                   help="COMP: neurons removed per block, the same everywhere (uniform) or from a global ranking of "
                        "normalised scores across blocks (adaptive)")
    p.add_argument("--damp", type=float, default=d.damp)
    p.add_argument("--ridge", type=float, default=d.ridge)
    add_common(p)
    p.set_defaults(func=cmd_prune)
