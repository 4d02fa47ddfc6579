"""CLI commands over the pruning, export and comparison APIs: prune | export | compare."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import CompruneError


def _config_from_args(args):
    from .config import PruneConfig
    cfg = PruneConfig(ratio=args.ratio, method=args.method, nsamples=args.nsamples, seqlen=args.seqlen,
                      calib=args.calib, seed=args.seed, device=args.device, batch_size=args.calib_batch_size,
                      metric=args.metric, layer_score=args.layer_score, mask_tuning=not args.no_mask_tuning,
                      round_to=args.round_to, damp=args.damp, ridge=args.ridge, recovery=args.recovery,
                      width_allocation=args.width_allocation, head_share=args.head_share)
    if args.layer_share is not None:
        cfg.layer_share = args.layer_share
    return cfg.validate()


def _refuse_stale_checkpoint(out: Path, args):
    from .outputs import sibling
    ckpt_dir = sibling(out, "checkpoint")
    if (ckpt_dir / "state.json").exists() and not (args.resume or args.force):
        raise CompruneError(f"an interrupted run left a checkpoint in {ckpt_dir}: pass --resume to continue it "
                            "or --force to start over")
    return ckpt_dir


def cmd_prune_stream(args, cfg) -> int:
    """comprune prune DIR --stream: the same prune, one decoder block in memory at a time (comprune.stream)."""
    from .cli import _table
    from .outputs import check_output, guard_output
    from .stream import prune_streaming
    out = check_output(Path(args.out), args.force)
    with guard_output(out, resume=args.resume, before=lambda: _refuse_stale_checkpoint(out, args)):
        report = prune_streaming(args.model, out, cfg, resume=args.resume, force=args.force, progress=not args.json,
                                 dtype=args.dtype, base_model=args.model, trust_remote_code=args.trust_remote_code,
                                 data_dir=args.data_dir,
                                 lite=not getattr(args, "stream_transformers_modules", False))
    if args.json:
        print(json.dumps({"out": str(out), **{k: v for k, v in report.to_dict().items() if k != "blocks"}}, indent=2))
    else:
        print(_table(report.summary_rows(), list(report.summary_rows()[0])))
        print(f"removed layers: {report.removed_layers or 'none'}; saved to {out} (streamed)")
    return 0


def cmd_prune(args) -> int:
    if getattr(args, "stream", False):
        return cmd_prune_stream(args, _config_from_args(args))
    from . import load
    from .cli import _table
    from .data import get_calibration
    from .io import save_pretrained
    from .outputs import check_output, guard_output, sibling
    from .prune import prune
    cfg = _config_from_args(args)
    out = check_output(Path(args.out), args.force)  # fail before any work, and never leave a half-written directory
    ckpt_dir = sibling(out, "checkpoint")
    with guard_output(out, resume=args.resume, before=lambda: _refuse_stale_checkpoint(out, args)):
        model, tok = load(args.model, dtype=args.dtype, device="cpu", trust_remote_code=args.trust_remote_code,
                          allow_pickle=args.allow_pickle)
        calib = get_calibration(tok, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed, data_dir=args.data_dir)
        model, report = prune(model, tok, cfg, calibration=calib, progress=not args.json, base_model=args.model,
                              checkpoint_dir=ckpt_dir, resume=args.resume)
        save_pretrained(model, tok, out, report, force=args.force)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if args.json:
        print(json.dumps({"out": str(out), **{k: v for k, v in report.to_dict().items() if k != "blocks"}}, indent=2))
    else:
        print(_table(report.summary_rows(), list(report.summary_rows()[0])))
        print(f"removed layers: {report.removed_layers or 'none'}; saved to {out}")
    return 0


def cmd_export(args) -> int:
    from .export.gguf import export_gguf
    if not args.gguf:
        raise CompruneError("nothing to export: pass --gguf OUT.gguf")
    summary = export_gguf(args.model_dir, args.gguf, qtype=args.type, force=args.force)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        from .cli import _table
        print(_table([{k: v for k, v in summary.items() if not isinstance(v, (list, dict))}],
                     [k for k, v in summary.items() if not isinstance(v, (list, dict))]))
    return 0


def cmd_compare(args) -> int:
    from .cli import _floats
    from .compare import compare
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    skip = [x.strip() for x in (args.skip or "").split(",") if x.strip()]
    ratios = _floats(args.ratios)
    import math
    for name in ("full_ratio", "zeroshot_ratio"):
        if not math.isfinite(getattr(args, name)):
            raise CompruneError(f"--{name.replace('_', '-')} must be a number (got {getattr(args, name)}): "
                                "e.g. 0.2, or -1 for none")
    if not all(math.isfinite(r) for r in ratios):
        raise CompruneError(f"--ratios must be finite numbers in (0, 0.9] (got {args.ratios})")
    if not ratios or not methods:
        raise CompruneError("nothing to compare: pass --ratios 0.1,0.2,0.3 and --methods comp,flap,...")
    result = compare(args.model, ratios, methods, args.out, calib=args.calib, nsamples=args.nsamples,
                     seqlen=args.seqlen, seed=args.seed, ppl_max_tokens=args.max_tokens,
                     full_ratio=None if args.full_ratio < 0 else args.full_ratio,
                     zeroshot_ratio=None if args.zeroshot_ratio < 0 else args.zeroshot_ratio,
                     zeroshot_subset=args.subset, speed_tokens=args.speed_tokens, data_dir=args.data_dir,
                     dtype=args.dtype, keep_models=args.keep_models, skip=skip, progress=not args.json,
                     zeroshot_cache_dir=args.zeroshot_cache_dir,
                     stream_ratios=_floats(args.stream_ratios) if args.stream_ratios else None,
                     redo=[x.strip() for x in (args.redo or "").split(",") if x.strip()], redo_tag=args.redo_tag)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print((Path(args.out) / "results.md").read_text())
        print(f"results: {args.out}/results.json, results.md, results.png")
    return 0


def add_commands(sub, add_common):
    from .config import METHODS, NEURON_METRICS, LAYER_SCORES, WIDTH_ALLOCATIONS, PruneConfig
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

    from .compare import DEFAULT_METHODS, DEFAULT_OUT, STAGES
    p = sub.add_parser("compare", help="prune with COMP and the baselines on the same calibration data and "
                                       "evaluate them alike (resumable)")
    p.add_argument("model", help="'smollm2', a model directory, a .gguf file or a hub id")
    p.add_argument("--ratios", default="0.1,0.2,0.3", help="comma-separated pruning ratios (default 0.1,0.2,0.3)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, any of {', '.join(METHODS)}")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT}); reruns resume")
    p.add_argument("--calib", default=d.calib)
    p.add_argument("--nsamples", type=int, default=d.nsamples)
    p.add_argument("--seqlen", type=int, default=d.seqlen)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-tokens", type=int, default=65536, help="perplexity slice: first N test tokens (65536)")
    p.add_argument("--full-ratio", type=float, default=0.2, help="ratio evaluated on the full test set too (-1: none)")
    p.add_argument("--zeroshot-ratio", type=float, default=0.2, help="ratio with zero-shot scores (-1: none)")
    p.add_argument("--subset", type=int, default=200, help="zero-shot examples per task (fixed-seed draw)")
    p.add_argument("--zeroshot-cache-dir", default=None,
                   help="lm_eval response cache, JSON in sqlite (default: OUT/zeroshot-cache)")
    p.add_argument("--speed-tokens", type=int, default=64, help="new tokens per generation-speed run")
    p.add_argument("--stream-ratios", default=None,
                   help="ratios at which methods that can stream are also pruned with --stream, for its time and "
                        "memory (default: the zero-shot ratio)")
    p.add_argument("--skip", default=None, help=f"stages to skip, comma-separated: {', '.join(STAGES)}")
    p.add_argument("--redo", default=None, help="measure these stages again for every run (prune: re-pruned, "
                   "time and memory re-measured, the model checked identical; speed): e.g. on a quiet machine")
    p.add_argument("--redo-tag", default=None, help="a name for the --redo pass: results carrying it count as "
                   "redone, so an interrupted --redo resumes when given the same tag")
    p.add_argument("--keep-models", action="store_true", help="keep the pruned model directories")
    add_common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="export a (pruned) model directory for on-device runtimes")
    p.add_argument("model_dir")
    p.add_argument("--gguf", default=None, help="write a GGUF file for llama.cpp")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0"])
    p.add_argument("--force", action="store_true", help="replace an existing --gguf file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)
