"""comprune plan: which (ratio, GGUF type) pairs meet a size or speed budget, and whether quantization alone
does (comprune.budget.frontier)."""
from __future__ import annotations

from ..budget.frontier import PLAN_TYPES, plan
from ..outputs import json_text
from .format import table


def cmd_plan(args) -> int:
    result = plan(args.model, target_size=args.target_size, target_speedup=args.target_speedup,
                  frontier=args.frontier, method=args.method, types=args.types)
    if args.json:
        print(json_text(result, indent=2))
        return 0
    budget = f"{result['budget_bytes'] / 1e6:.1f} MB" + (f" ({args.target_speedup}x the f16 file's speed, predicted "
                                                         "from bytes)" if args.target_speedup else "")
    print(f"{result['model']}: GGUF within {budget}; frontier: {result['frontier'] or 'none (quality not measured)'}")
    rows = [{"type": c["qtype"], "method": c["method"], "ratio": f"{c['ratio']:.3f}",
             "MB": f"{c['gguf_bytes'] / 1e6:.1f}" + ("" if c["bytes_exact"] else " max"),
             "PPL": "-" if c["ppl"] is None else f"{c['ppl']:.2f}", "quality": c["quality"],
             "vs f16": f"{c['speedup_vs_f16']:.2f}x", "speed": c["speed"]} for c in result["candidates"]]
    if rows:
        print(table(rows, list(rows[0])))
    for qtype, why in result["refused"].items():
        print(f"  {qtype}: {why}")
    print(result["verdict"])
    return 0


def add_command(sub):
    p = sub.add_parser("plan", help="the (ratio, type) pairs meeting a GGUF size or speed budget, by the frontier")
    p.add_argument("model", help="model directory of safetensors, or an embedded alias (smollm2)")
    p.add_argument("--target-size", default=None, help="the largest GGUF file, e.g. 60MB or 75MiB")
    p.add_argument("--target-speedup", type=float, default=None,
                   help="llama.cpp generation this many times the dense f16 file's (measured where the frontier has "
                        "the point, else predicted from bytes)")
    p.add_argument("--frontier", default=None,
                   help="benchmarks/frontier.py's JSON (default: benchmarks/results/frontier_MODEL.json if present)")
    p.add_argument("--method", default="comp", help="the pruning method whose measured points to use (default comp)")
    p.add_argument("--types", nargs="+", default=None, help=f"GGUF types to consider (default {' '.join(PLAN_TYPES)})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
