"""The quality and time cost of `--dtype auto`: the same COMP prune of SmolLM2 in float32 and in
auto precision, each pruned model evaluated in float32 and in auto, eager, on the same slice; and dense eval
speed in both precisions on the same slice.

    python benchmarks/precision_cost.py [--ratio 0.2] [--max-tokens 16384]

Every number comes from the CLI (`comprune prune|eval --json`), run one at a time in child processes, so it is
what a user gets. Writes benchmarks/results/precision_cost.json and .md (command, machine, load, versions).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from comprune import precision  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "precision_cost"
CLI = [sys.executable, "-m", "comprune.cli"]


def cli(*args: str) -> tuple[dict | list, float]:
    t0 = time.perf_counter()
    done = subprocess.run([*CLI, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"comprune {shlex.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout), time.perf_counter() - t0


def ppl_rows(result) -> dict:
    rows = result if isinstance(result, list) else [result]
    return {str(r["seqlen"]): {k: r.get(k) for k in ("ppl", "tokens_per_second", "dtype")} for r in rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    ev = ["--seqlen", "128,2048", "--max-tokens", str(args.max_tokens), "--compile", "off", "--json"]
    load_before = os.getloadavg()
    res = {"command": "python benchmarks/precision_cost.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"cpu": precision.cpu_name(), "cores": os.cpu_count(), "native_bf16_flags": precision.native_bf16()},
           "slice": f"first {args.max_tokens} WikiText-2 test tokens, eager (--compile off)", "prunes": {},
           "dense": {}}
    with tempfile.TemporaryDirectory(prefix="comprune-precision-") as tmp:
        for dt in ("float32", "auto"):
            r, _ = cli("eval", args.model, "--dtype", dt, *ev)
            res["dense"][dt] = ppl_rows(r)
        for dt in ("float32", "auto"):
            out = Path(tmp) / dt
            report, wall = cli("prune", args.model, "--ratio", str(args.ratio), "--dtype", dt, "--out", str(out),
                               "--json")
            entry = {"prune_wall_seconds": round(wall, 1), "precision": report.get("precision"),
                     "prune_seconds": report.get("seconds"), "eval": {}}
            for edt in ("float32", "auto"):
                r, _ = cli("eval", str(out), "--dtype", edt, *ev)
                entry["eval"][edt] = ppl_rows(r)
            res["prunes"][dt] = entry
    res["load_avg_before"] = [round(x, 2) for x in load_before]
    res["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# The cost of `--dtype auto`: COMP prune and eval in float32 and in auto precision", "",
             f"Command: `{res['command']}` ({res['date']}). Machine: {m['cpu']}, {m['cores']} cores, native bf16 "
             f"flags: {', '.join(m['native_bf16_flags']) or 'none'}; load {res['load_avg_before']} before, "
             f"{res['load_avg_after']} after. Slice: {res['slice']}.", "",
             "Dense eval speed on the slice (tokens/s, eager; PPL beside):", "",
             "| eval precision | ran | PPL@128 | tok/s @128 | PPL@2048 | tok/s @2048 |", "|---|---|---:|---:|---:|---:|"]
    for dt, r in res["dense"].items():
        lines.append(f"| {dt} | {r['128']['dtype']} | {r['128']['ppl']:.4f} | {r['128']['tokens_per_second']:,.0f} | "
                     f"{r['2048']['ppl']:.4f} | {r['2048']['tokens_per_second']:,.0f} |")
    if {"float32", "auto"} <= set(res["dense"]):
        f, a = res["dense"]["float32"], res["dense"]["auto"]
        lines += ["", "auto / float32: " + ", ".join(
            f"{a[s]['tokens_per_second'] / f[s]['tokens_per_second']:.2f}x the tokens/s at seqlen {s}, PPL "
            f"{100 * (a[s]['ppl'] / f[s]['ppl'] - 1):+.3f} %" for s in ("128", "2048")) + "."]
    lines += ["", "Pruned models (PPL of each prune, evaluated in each precision; Δ against the float32 prune "
              "evaluated the same way):", "",
              "| prune precision | ran | prune s | eval | PPL@128 | Δ | PPL@2048 | Δ |", "|---|---|---:|---|---:|---:|---:|---:|"]
    ref = res["prunes"].get("float32", {}).get("eval", {})
    for dt, p in res["prunes"].items():
        for edt, r in p["eval"].items():
            d = {s: 100 * (r[s]["ppl"] / ref[edt][s]["ppl"] - 1) for s in ("128", "2048")} if edt in ref else {}
            lines.append(f"| {dt} | {(p.get('precision') or {}).get('dtype', '?')} | {round(p['prune_seconds'] or p['prune_wall_seconds'], 1)} | "
                         f"{edt} ({r['128']['dtype']}) | {r['128']['ppl']:.4f} | {d.get('128', 0):+.2f} % | "
                         f"{r['2048']['ppl']:.4f} | {d.get('2048', 0):+.2f} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
