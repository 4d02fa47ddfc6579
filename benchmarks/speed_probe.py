"""The evaluator against the hardware: dense SmolLM2 WikiText-2 test perplexity at seqlen 128 and 2048 in the
precision `--dtype auto` picks here, with tokens/s and the fraction of the matmul probe's peak.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/speed_probe.py     # first 16,384 test tokens (fixed slice)
    nice -n 19 python benchmarks/speed_probe.py --max-tokens 0        # the full test set, all threads

FLOPs per token and the peak: comprune.evaluate.hardware (the formula is in the JSON). Writes
benchmarks/results/eval_speed.json and .md with the command, machine, precision and load average (the machine
may be shared: the load average before and after says how much to trust the tokens/s).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import comprune  # noqa: E402
from comprune import precision  # noqa: E402
from comprune.data import load_ids  # noqa: E402
from comprune.evaluate.hardware import FORMULA, PEAK_SECONDS, against_peak, use_sdpa  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "eval_speed"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seqlens", default="128,2048")
    ap.add_argument("--max-tokens", type=int, default=16384, help="first N test tokens (0: the full test set)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--compile", default="on", choices=["auto", "on", "off"],
                    help="torch.compile in the evaluator (evaluate/compiled.py; default on: the slice is short)")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the .json, nothing run")
    args = ap.parse_args(argv)
    if args.markdown_only:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return
    load_before = os.getloadavg()
    model, tok = comprune.load(args.model, dtype=args.dtype)
    attn = use_sdpa(model)
    ids = load_ids(tok, "wikitext2")
    dtype, shape = next(model.parameters()).dtype, precision.probe_shape(model.config)
    rows = []
    for seqlen in [int(s) for s in args.seqlens.split(",")]:
        # the peak probed just before and just after each evaluation, the higher one used: on a shared machine
        # a single probe can land in a busy moment
        before = precision.measure_gflops(dtype, shape, seconds=PEAK_SECONDS)
        r = comprune.perplexity(model, tok, "wikitext2", seqlen=seqlen, max_tokens=args.max_tokens or None, ids=ids,
                                progress=False, compile=args.compile)
        after = precision.measure_gflops(dtype, shape, seconds=PEAK_SECONDS)
        # the evaluator's rate is the steady one: the first batch holds torch.compile's compilation (reported
        # beside it, and included in the wall-clock tokens/s)
        rate = r.get("steady_tokens_per_second") or r["tokens_per_second"]
        r["hardware"] = against_peak(model, rate, seqlen, peak=max(before, after))
        r["hardware"]["rate"] = "steady_tokens_per_second" if r.get("steady_tokens_per_second") else \
            "tokens_per_second"
        r["hardware"]["peak_gflops_before_after"] = [round(before, 2), round(after, 2)]
        r["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
        rows.append(r)
        print(f"seqlen {seqlen}: ppl {r['ppl']:.4f}, {r['tokens_per_second']} tok/s, "
              f"{r['hardware']['achieved_gflops']} GFLOP/s = {100 * r['hardware']['fraction_of_peak']:.1f} % of "
              f"the {r['dtype']} probe's {r['hardware']['peak_gflops']} GFLOP/s", flush=True)
    command = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} nice -n {os.nice(0)} python "
               "benchmarks/speed_probe.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    result = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cpu": precision.cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                          "native_bf16_flags": precision.native_bf16()},
              "load_avg_before": [round(x, 2) for x in load_before],
              "load_avg_after": [round(x, 2) for x in os.getloadavg()],
              "versions": {"torch": torch.__version__, "comprune": comprune.__version__},
              "model": args.model, "precision": model.comprune_precision, "attn_implementation": attn,
              "slice": f"first {args.max_tokens} WikiText-2 test tokens" if args.max_tokens else "full test set",
              "flops_formula": FORMULA, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out.with_suffix('.json')} and .md")


def markdown(res: dict) -> str:
    p, m = res["precision"], res["machine"]
    lines = ["# The evaluator against the hardware: dense WikiText-2 perplexity speed", "",
             f"Command: `{res['command']}` ({res['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads; native bf16 matmul flags: "
             f"{', '.join(m['native_bf16_flags']) or 'none'}. 1/5/15-min load average "
             f"{' / '.join(map(str, res['load_avg_before']))} before, {' / '.join(map(str, res['load_avg_after']))} "
             "after (the machine is shared: tokens/s scale with the share of the cores this run got).", "",
             f"Precision: `--dtype {p['requested']}` ran **{p['dtype']}** ({p['reason']}). Attention: "
             f"{res['attn_implementation']}. Slice: {res['slice']}.", "",
             "| seqlen | windows | tokens | PPL | compiled | first batch s | tokens/s (wall) | tokens/s (steady) "
             "| achieved GFLOP/s | probe peak GFLOP/s (before / after) | fraction of peak |",
             "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        h = r["hardware"]
        steady = r.get("steady_tokens_per_second")
        if steady and h.get("rate") != "steady_tokens_per_second":  # a record made before the rate was steady
            h = {**h, "achieved_gflops": h["flops_per_token"] * steady / 1e9}
            h["fraction_of_peak"] = h["achieved_gflops"] / h["peak_gflops"]
        lines.append(f"| {r['seqlen']} | {r['windows']} | {r['tokens']:,} | {r['ppl']:.4f} | "
                     f"{'yes' if r.get('compiled') else 'no'} | {r.get('first_batch_seconds', 0):.1f} | "
                     f"{r['tokens_per_second']:,.1f} | {steady or r['tokens_per_second']:,.1f} | "
                     f"{h['achieved_gflops']:.1f} | {h['peak_gflops']:.1f} "
                     f"({' / '.join(f'{x:.1f}' for x in h['peak_gflops_before_after'])}) | "
                     f"{100 * h['fraction_of_peak']:.1f} % |")
    h = res["rows"][0]["hardware"] if res["rows"] else {}
    lines += ["", "Achieved GFLOP/s and the fraction of peak are at the steady rate: without the first batch, "
              "where torch.compile compiles (evaluate/compiled.py; the wall-clock rate includes it).", "",
              f"FLOPs per token: {res['flops_formula']}. Peak: comprune.precision's probe, a "
              f"{' x '.join(map(str, h.get('peak_probe', {}).get('shape', [])))} (tokens x hidden @ hidden x "
              f"intermediate) matmul in {p['dtype']} on the same threads, best of ~{PEAK_SECONDS} s of runs, probed "
              "just before and just after each evaluation, the higher used. Both are this process's rates: under "
              "load they are only comparable when the load was the same during both, and a fraction above 100 % "
              "means the probes caught busier moments than the evaluation did.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
