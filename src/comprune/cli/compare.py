"""comprune compare: COMP and the baselines pruned and evaluated alike (resumable)."""
from __future__ import annotations

import math
from pathlib import Path

from ..compare import DEFAULT_METHODS, DEFAULT_OUT, STAGES, check_results_dir, compare
from ..config import PRESETS, PruneConfig
from ..registry import names as method_names
from ..errors import CompruneError
from ..outputs import json_text
from .format import add_common, floats


def cmd_compare(args) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    skip = [x.strip() for x in (args.skip or "").split(",") if x.strip()]
    ratios = floats(args.ratios)
    for name in ("full_ratio", "zeroshot_ratio"):
        if not math.isfinite(getattr(args, name)):
            raise CompruneError(f"--{name.replace('_', '-')} must be a number (got {getattr(args, name)}): "
                                "e.g. 0.2, or -1 for none")
    stream_ratios = floats(args.stream_ratios) if args.stream_ratios else None
    for flag, values in (("--ratios", ratios), ("--stream-ratios", stream_ratios or [])):
        if not all(math.isfinite(r) and 0 < r <= 0.9 for r in values):  # nan fails every comparison: refuse it
            raise CompruneError(f"{flag} must be numbers in (0, 0.9] (got {getattr(args, flag[2:].replace('-', '_'))}"
                                "): e.g. 0.1,0.2,0.3")
    if not ratios or not methods:
        raise CompruneError("nothing to compare: pass --ratios 0.1,0.2,0.3 and --methods comp,flap,...")
    check_results_dir(args.out)
    result = compare(args.model, ratios, methods, args.out, calib=args.calib, nsamples=args.nsamples,
                     seqlen=args.seqlen, seed=args.seed, ppl_max_tokens=args.max_tokens,
                     full_ratio=None if args.full_ratio < 0 else args.full_ratio,
                     zeroshot_ratio=None if args.zeroshot_ratio < 0 else args.zeroshot_ratio,
                     zeroshot_subset=args.subset, speed_tokens=args.speed_tokens, data_dir=args.data_dir,
                     dtype=args.dtype, keep_models=args.keep_models, skip=skip, progress=not args.json,
                     zeroshot_cache_dir=args.zeroshot_cache_dir,
                     stream_ratios=stream_ratios,
                     redo=[x.strip() for x in (args.redo or "").split(",") if x.strip()], redo_tag=args.redo_tag,
                     zeroshot_full=args.zeroshot_full, trust_remote_code=args.trust_remote_code,
                     allow_pickle=args.allow_pickle,
                     full_seqlens=[int(x) for x in floats(args.full_seqlens)] if args.full_seqlens else None,
                     nproc=args.nproc)
    check_some_result(result, args.out)
    if args.json:
        print(json_text(result, indent=2))
    else:
        print((Path(args.out) / "results.md").read_text())
        print(f"results: {args.out}/results.json, results.md, results.png")
    return 0


def check_some_result(result: dict, out) -> None:
    """A comparison in which no method produced a result is a failure, not an empty table with exit 0."""
    pruned = [r for r in result["rows"] if r["method"] != "dense"]
    if any(not (r.get("errors") or {}).get("prune") for r in pruned):
        return
    if pruned:
        first = pruned[0]
        raise CompruneError(f"no method produced a result: every prune failed (first, {first['method']} at "
                            f"{first['ratio']}: {' '.join(first['errors']['prune'].split())[:300]}); see {out}/logs")
    raise CompruneError(f"no method produced a result in {out}: nothing was pruned (is prune in --skip?)")


def add_command(sub):
    d = PruneConfig()
    p = sub.add_parser("compare", help="prune with COMP and the baselines on the same calibration data and "
                                       "evaluate them alike (resumable)")
    p.add_argument("model", help="'smollm2', a model directory, a .gguf file or a hub id")
    p.add_argument("--ratios", default="0.1,0.2,0.3", help="comma-separated pruning ratios (default 0.1,0.2,0.3)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, any of {', '.join(method_names())}, or a preset ({', '.join(PRESETS)}); +tune or +distill after one adds that recovery stage (e.g. comp-search+tune)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT}); reruns resume")
    p.add_argument("--calib", default=d.calib)
    p.add_argument("--nsamples", type=int, default=d.nsamples)
    p.add_argument("--seqlen", type=int, default=d.seqlen)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-tokens", type=int, default=65536, help="perplexity slice: first N test tokens (65536)")
    p.add_argument("--full-ratio", type=float, default=0.2, help="ratio evaluated on the full test set too (-1: none)")
    p.add_argument("--full-seqlens", default=None,
                   help="window lengths of the full-test-set perplexity, comma-separated (default: those of the "
                        "slice, 128,2048); e.g. 2048 alone halves that stage on a slow host")
    p.add_argument("--zeroshot-ratio", type=float, default=0.2, help="ratio with zero-shot scores (-1: none)")
    p.add_argument("--subset", type=int, default=200, help="zero-shot examples per task (fixed-seed draw)")
    p.add_argument("--zeroshot-full", action="store_true",
                   help="also evaluate the seven tasks' full sets at the zero-shot ratio (hours on a CPU; resumable "
                        "per task and method; per-example results for paired tests); --subset stays the quick mode")
    p.add_argument("--zeroshot-cache-dir", default=None,
                   help="lm_eval response cache, JSON in sqlite (default: OUT/zeroshot-cache)")
    p.add_argument("--speed-tokens", type=int, default=64,
                   help="new tokens per generation-speed run (transformers and llama.cpp)")
    p.add_argument("--stream-ratios", default=None,
                   help="ratios at which methods that can stream are also pruned with --stream, for its time and "
                        "memory (default: the zero-shot ratio)")
    p.add_argument("--skip", default=None, help=f"stages to skip, comma-separated: {', '.join(STAGES)}")
    p.add_argument("--redo", default=None, help="measure these stages again for every run (prune: re-pruned, "
                   "time and memory re-measured, the model checked identical; speed): e.g. on a quiet machine")
    p.add_argument("--redo-tag", default=None, help="a name for the --redo pass: results carrying it count as "
                   "redone, so an interrupted --redo resumes when given the same tag")
    p.add_argument("--nproc", type=int, default=1, help="processes per prune: > 1 runs each prune as a torchrun "
                   "group on this host (docs/distributed.md); its peak RSS is the group's largest process")
    p.add_argument("--keep-models", action="store_true", help="keep the pruned model directories")
    add_common(p)
    p.set_defaults(func=cmd_compare)
