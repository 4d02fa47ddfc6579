"""Gemma 3 270M on held-out text: COMP's per-block settings against wanda-sp at 20 % of the blocks' parameters,
for choosing defaults on a second model (WikiText-2 validation and the C4 held-out documents, never the test set).

    python benchmarks/gemma3_heldout.py                       # every row not measured yet
    python benchmarks/gemma3_heldout.py --only comp,tokw-none

Each row runs in its own process and writes benchmarks/results/gemma3_heldout/<row>.json; the table
(benchmarks/results/gemma3_heldout.md) is rebuilt from whatever JSONs exist, so a killed run resumes.
Needs the optional Gemma 3 wheels (`make gemma3`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
OUT = HERE / "results" / "gemma3_heldout"
SETS = ("wikitext2-validation", "c4-validation")
# (row, what it is, PruneConfig overrides); ratio 0.2 of the blocks for every row
ROWS = [
    ("dense", "the unpruned model", None),
    ("comp", "COMP's default (token weights by the next norm's scale: the projection output's here)", {}),
    ("tokw-none", "COMP without token weights", {"token_weight": "none"}),
    ("wanda-sp", "the best harness baseline on this model's test slice (benchmarks/results/gemma3.md)",
     {"method": "wanda-sp"}),
]


def run_row(name: str, overrides: dict | None, tokens: int, threads: int) -> dict:
    import torch

    import comprune
    torch.set_num_threads(threads)
    model, tok = comprune.load("gemma3-270m")
    row = {"row": name, "overrides": overrides}
    if overrides is not None:
        cfg = comprune.PruneConfig(ratio=0.2, ratio_of="blocks", **overrides)
        t0 = time.perf_counter()
        model, rep = comprune.prune(model, tok, cfg, progress=False, base_model="gemma3-270m")
        row.update(prune_s=round(time.perf_counter() - t0, 1), params_after=rep.params_after,
                   mlp_widths=sorted(set(rep.mlp_widths)), calibration=rep.calibration)
    for ds in SETS:
        row[ds] = comprune.perplexity(model, tok, ds, seqlen=128, max_tokens=tokens, progress=False)["ppl"]
    row.update(tokens=tokens, seqlen=128, threads=threads, loadavg=round(os.getloadavg()[0], 2),
               machine=f"{platform.machine()}, {os.cpu_count()} cores", precision="float32",
               finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    return row


def table(tokens: int) -> None:
    rows = [json.loads((OUT / f"{n}.json").read_text()) for n, _, _ in ROWS if (OUT / f"{n}.json").exists()]
    rows += [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json")) if p.stem not in {n for n, _, _ in ROWS}]
    what = {n: w for n, w, _ in ROWS}
    lines = ["# Gemma 3 270M, held-out perplexity at 20 % of the blocks' parameters", "",
             f"Command: `python benchmarks/gemma3_heldout.py`. Windows of <bos> + 127 tokens, first {tokens:,} tokens "
             "of WikiText-2 validation and of the C4 sample's held-out documents (never calibrated on); calibration "
             "128 x 128 C4 tokens, seed 0; float32, CPU. Rows with a `commit` ran at that commit (a setting the "
             "code no longer has).", "",
             "| row | what | MLP widths | WikiText-2 val | C4 held-out | prune s |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        w = r.get("mlp_widths", [2048])
        w = f"{w[0]}..{w[-1]}" if len(w) > 3 else w
        lines.append(f"| {r['row']} | {r.get('what') or what.get(r['row'], '')}"
                     f"{' (commit ' + r['commit'] + ')' if r.get('commit') else ''} | {w} | "
                     f"{r['wikitext2-validation']:.2f} | {r['c4-validation']:.2f} | {r.get('prune_s', '-')} |")
    lines += ["", "Prune seconds are wall-clock on a shared 2-core CPU (load in each JSON)."]
    (HERE / "results" / "gemma3_heldout.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated rows")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.one:
        overrides = next(o for n, _, o in ROWS if n == args.one)
        row = run_row(args.one, overrides, args.tokens, args.threads)
        tmp = OUT / f"{args.one}.tmp"
        tmp.write_text(json.dumps(row, indent=1) + "\n")
        os.replace(tmp, OUT / f"{args.one}.json")
        return
    wanted = args.only.split(",") if args.only else [n for n, _, _ in ROWS]
    for name in wanted:
        if (OUT / f"{name}.json").exists() and not args.only:
            continue
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, __file__, "--one", name, "--tokens", str(args.tokens),
                        "--threads", str(args.threads)], check=True)
        table(args.tokens)
    table(args.tokens)


if __name__ == "__main__":
    main()
