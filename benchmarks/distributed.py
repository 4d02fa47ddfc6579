"""A prune in one process against the same prune by a torchrun group (comprune.distributed) on this host's CPUs.

For each method (default COMP, and COMP with the width search), SmolLM2-135M-Instruct is pruned 20 % twice,
each run a fresh `comprune prune` command:
- 1 x 2: one process with 2 threads (OMP_NUM_THREADS=2);
- 2 x 1: `torchrun --standalone --nproc-per-node 2`, each rank one thread (gloo).
Recorded: the command's wall time, each process's peak RSS (its ru_maxrss, written by the rank itself), the
model files' sha256, whether every block kept the same neurons (and layers), and the largest logit difference
and the perplexity of both on 8 WikiText-2 validation windows of 128 tokens. The calibration is the default
(128 c4 windows of 128 tokens, batches of 8: 16 batches, 8 per rank).

    flock /tmp/comprune-heavy.lock .venv/bin/python benchmarks/distributed.py --methods comp
    flock /tmp/comprune-heavy.lock .venv/bin/python benchmarks/distributed.py --methods comp-search

Writes (merges into) benchmarks/results/distributed.json after every run and rewrites distributed.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# comp-search-g12: the width search cut to 12 generations (the preset runs 80), for a pair that fits a session
METHODS = {"comp": [], "comp-search": ["--preset", "comp-search"],
           "comp-search-g12": ["--preset", "comp-search", "--search-generations", "12"]}
MODES = {"1x2": dict(procs=1, threads=2), "2x1": dict(procs=2, threads=1)}


def rank_main(rss_dir: str, argv: list[str]) -> int:
    """One process of a run: the CLI, then this process's peak RSS into rss_dir/rank<RANK>.json."""
    sys.path.insert(0, str(ROOT / "src"))
    from comprune.cli import main
    code = main(argv)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    Path(rss_dir, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"peak_rss_mb": round(peak)}))
    return code


def run(method: str, mode: str, out: Path, model: str) -> dict:
    m = MODES[mode]
    rss = Path(tempfile.mkdtemp(prefix="comprune-dist-rss-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(m["threads"]), "MKL_NUM_THREADS": str(m["threads"]),
           "PYTHONPATH": str(ROOT / "src")}
    cli = ["prune", model, "--ratio", "0.2", *METHODS[method], "--out", str(out), "--force", "--json"]
    me = [str(Path(__file__).resolve()), "--rank-main", str(rss), "--"]
    if m["procs"] == 1:
        cmd = [sys.executable, *me, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={m['procs']}",
               *me, *cli]
    load0 = os.getloadavg()[0]  # the host is shared: what else ran shows here
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    load = [round(load0, 2), round(os.getloadavg()[0], 2)]
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    peaks = {p.stem: json.loads(p.read_text())["peak_rss_mb"] for p in sorted(rss.glob("rank*.json"))}
    shutil.rmtree(rss)
    man = json.loads((out / "pruning.json").read_text())
    return {"method": method, "mode": mode, "processes": m["procs"], "threads": m["threads"],
            "wall_s": round(wall, 1), "prune_s": round(man["seconds"], 1), "peak_rss_mb": peaks,
            "loadavg_1min_before_after": load,
            "sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
            "distributed": man.get("distributed", {}), "ratio_achieved": man["ratio_achieved"],
            "removed_layers": man["removed_layers"],
            "kept_neurons": {k: v["kept_neurons"] for k, v in man["blocks"].items()}}


def compare(a: Path, b: Path) -> dict:
    """Largest logit difference and both perplexities on 8 WikiText-2 validation windows of 128 tokens."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from comprune import from_pretrained
    from comprune.data import load_text, tokenize_stream
    models = [from_pretrained(str(p))[0].float().eval() for p in (a, b)]
    tok = from_pretrained(str(a))[1]
    ids = tokenize_stream(tok, load_text("wikitext2-validation"))[: 8 * 128].view(8, 128)
    out = {}
    with torch.no_grad():
        logits = [m(input_ids=ids).logits.float() for m in models]
    out["max_logit_diff"] = float((logits[0] - logits[1]).abs().max())
    for name, lg in zip(("ppl_1x2", "ppl_2x1"), logits):
        nll = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1))
        out[name] = round(float(nll.exp()), 4)
    return out


def write_md(res: dict, path: Path):
    lines = ["# One process against a torchrun group on the CPU", "",
             f"Host: {res.get('host', '?')}. SmolLM2-135M-Instruct, `comprune prune --ratio 0.2` (default calibration: "
             "128 c4 windows of 128 tokens in batches of 8). 1x2: one process, 2 threads; 2x1: `torchrun "
             "--standalone --nproc-per-node 2`, 1 thread per rank (gloo). Wall time is the whole command (loading "
             "included); prune time is pruning.json's `seconds` (rank 0). Peak RSS per process (ru_maxrss).", "",
             "| method | run | wall s | prune s | peak RSS MB per rank | same kept layers and neurons | "
             "max logit diff | ppl (wikitext2 val, 8x128) | load avg before, after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, r in res.get("runs", {}).items():
        for mode in MODES:
            if mode not in r:
                continue
            x = r[mode]
            cmp = r.get("compare", {})
            same = r.get("same_decisions", "-") if mode == "2x1" else ""
            diff = f"{cmp['max_logit_diff']:.2e}" if mode == "2x1" and cmp else ""
            ppl = cmp.get(f"ppl_{mode}", "-")
            lines.append(f"| {method} | {mode} | {x['wall_s']} | {x['prune_s']} | "
                         f"{', '.join(str(v) for v in x['peak_rss_mb'].values())} | {same} | {diff} | {ppl} | "
                         f"{', '.join(str(v) for v in x.get('loadavg_1min_before_after', [])) or '-'} |")
        if "1x2" in r and "2x1" in r:
            lines.append(f"| {method} | sha256 equal | {r['1x2']['sha256'] == r['2x1']['sha256']} | | | | | | |")
    lines += ["", "Commands:", "", "```", *res.get("commands", []), "```", ""]
    path.write_text("\n".join(lines))


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--rank-main":
        return rank_main(sys.argv[2], sys.argv[4:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["comp"], choices=list(METHODS))
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default=str(RESULTS / "distributed.json"))
    args = p.parse_args()
    path = Path(args.out)
    res = json.loads(path.read_text()) if path.exists() else {"runs": {}, "commands": []}
    from comprune.precision import host
    h = host()  # the CPU model and its native bf16 support: the CPU differs between sessions
    res["host"] = f"{h.get('cpu', '?')}, {os.cpu_count()} CPUs, {', '.join(h.get('native_bf16', [])) or 'no native bf16'}"
    cmd = f"flock /tmp/comprune-heavy.lock .venv/bin/python benchmarks/distributed.py --methods {' '.join(args.methods)}"
    if cmd not in res["commands"]:
        res["commands"].append(cmd)
    work = Path(tempfile.mkdtemp(prefix="comprune-dist-bench-"))
    try:
        for method in args.methods:
            r = res["runs"].setdefault(method, {})
            for mode in MODES:
                r[mode] = run(method, mode, work / f"{method}-{mode}", args.model)
                path.write_text(json.dumps(res, indent=2))
                print(f"{method} {mode}: {r[mode]['wall_s']} s, peak {r[mode]['peak_rss_mb']}", flush=True)
            a, b = r["1x2"], r["2x1"]
            r["same_decisions"] = a["removed_layers"] == b["removed_layers"] and a["kept_neurons"] == b["kept_neurons"]
            r["compare"] = compare(work / f"{method}-1x2", work / f"{method}-2x1")
            for mode in MODES:  # the decisions are compared above; the file stays small
                r[mode].pop("kept_neurons")
            path.write_text(json.dumps(res, indent=2))
            write_md(res, path.with_suffix(".md"))
            print(json.dumps({k: v for k, v in r.items() if k not in MODES}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_md(res, path.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
