"""The packed zero-shot runner against lm_eval's own loop on SmolLM2: same per-example scores, time of each.

    python benchmarks/zeroshot_runner.py --tasks hellaswag,arc_easy --limit 50

Writes benchmarks/results/zeroshot_runner.{json,md}. Both runners score the same requests of the same tasks;
"identical" compares every example's 0/1 score on the task's paper metric.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

import comprune
from comprune.evaluate.zeroshot import PAPER_METRIC, evaluate_zeroshot

OUT = Path(__file__).resolve().parent / "results"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="hellaswag,arc_easy")
    ap.add_argument("--limit", type=int, default=50)
    args = ap.parse_args()
    model, tok = comprune.load("smollm2")[:2]
    load_before = os.getloadavg()
    runs = {}
    for runner in ("packed", "hflm"):
        r = evaluate_zeroshot(model, tok, args.tasks, limit=args.limit, progress=False, runner=runner, per_example=True)
        runs[runner] = r
        print(runner, r["seconds"], "s", flush=True)
    tasks = {t: {"metric": PAPER_METRIC[t],
                 "packed": runs["packed"]["tasks"][t][runs["packed"]["tasks"][t]["metric"]],
                 "hflm": runs["hflm"]["tasks"][t][runs["hflm"]["tasks"][t]["metric"]],
                 "identical": runs["packed"]["tasks"][t]["correct"] == runs["hflm"]["tasks"][t]["correct"]}
             for t in runs["packed"]["tasks"]}
    res = {"command": "python benchmarks/zeroshot_runner.py " + " ".join(sys.argv[1:]), "model": "smollm2",
           "dtype": str(next(model.parameters()).dtype), "threads": torch.get_num_threads(),
           "machine": f"{platform.machine()} {os.cpu_count()} cores", "load_before": load_before,
           "load_after": os.getloadavg(), "limit": args.limit, "tasks": tasks,
           "seconds": {k: v["seconds"] for k, v in runs.items()},
           "speedup": round(runs["hflm"]["seconds"] / runs["packed"]["seconds"], 2)}
    (OUT / "zeroshot_runner.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# Zero-shot runners: packed vs lm_eval's loop (SmolLM2-135M-Instruct)", "",
             f"Command: `{res['command']}`. Machine: {res['machine']}, {res['threads']} torch threads, {res['dtype']}; "
             f"1/5/15-min load {'/'.join(f'{x:.2f}' for x in load_before)} before, "
             f"{'/'.join(f'{x:.2f}' for x in res['load_after'])} after (shared host: times are comparable within "
             "this table only).", "",
             "| task | metric | packed | lm_eval loop | every example identical |", "|---|---|---:|---:|---|"]
    lines += [f"| {t} | {v['metric']} | {100 * v['packed']:.2f} | {100 * v['hflm']:.2f} | {v['identical']} |"
              for t, v in tasks.items()]
    lines += ["", f"Time: packed {res['seconds']['packed']} s, lm_eval loop {res['seconds']['hflm']} s "
              f"({res['speedup']}x)."]
    (OUT / "zeroshot_runner.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
