"""COMP ablations on SmolLM2-135M: ratios 0.1/0.2/0.3 and, at 0.2, mask tuning off, neuron metric
variants, layer_share, BI vs loss layer score, calibration size.

Every configuration runs in its own subprocess (so its peak RSS is its own) and writes
benchmarks/results/comp_ablation/<name>.json as soon as it finishes; a rerun computes only what is missing.
Calibration: C4 sample (never the evaluation text), seed 0. Evaluation: WikiText-2 test, first --tokens
tokens, windows of 128 and 2048.

    python benchmarks/comp_ablation.py                 # run everything missing, then write the table
    python benchmarks/comp_ablation.py --table         # only rebuild the markdown table

Held-out selection (defaults are never chosen on the test text): the same rows evaluated on the
WikiText-2 *validation* split, written to results/comp_ablation_validation/ and comp_ablation_validation.md:

    python benchmarks/comp_ablation.py --eval wikitext2-validation \
        --only dense,comp-0.2,recovery-least-squares,metric-activation,metric-activation-ls,metric-weighted-norm,baseline-wanda-sp
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "comp_ablation"
BASE = dict(ratio=0.2)
# The literal spec (comp.md's fill-ins; `--preset comp-spec`), and its least-squares/OBS variant.
SPEC = {"metric": "condition", "recovery": "scales", "target_mix": 0.0, "layer_compensation": False, "token_weight": "none",
        "head_share": 0.0, "nsamples": 128, "seqlen": 128, "layer_share": 0.25, "damp": 0.01}
LSOBS = {"recovery": "least-squares", "metric": "obs"}
# Today's default written out (OBS + least squares + token weights, no block removed), so its rows stay what they
# measured when a default moves again.
DEFAULT = SPEC | LSOBS | {"token_weight": "output", "layer_share": 0.0}
# (name, group, overrides) in priority order: the defaults first, so an interrupted run has the key rows.
CONFIGS = [
    ("dense", "reference", None),
    ("comp-0.2", "ratio", {}),
    ("comp-0.1", "ratio", {"ratio": 0.1}),
    ("comp-0.3", "ratio", {"ratio": 0.3}),
    ("no-mask-tuning", "recovery", SPEC | {"mask_tuning": False}),
    ("recovery-least-squares", "recovery", SPEC | {"recovery": "least-squares"}),
    ("metric-kappa-loo", "metric", SPEC | {"metric": "kappa-loo"}),
    ("metric-weighted-norm", "metric", SPEC | {"metric": "weighted-norm"}),
    ("metric-activation", "metric", SPEC | {"metric": "activation"}),
    ("metric-magnitude", "metric", SPEC | {"metric": "magnitude"}),
    ("layer-share-0", "layer_share", SPEC | {"layer_share": 0.0}),
    ("layer-share-0.5", "layer_share", SPEC | {"layer_share": 0.5}),
    ("nsamples-32", "nsamples", SPEC | {"nsamples": 32}),
    ("layer-share-0.75", "layer_share", SPEC | {"layer_share": 0.75}),
    ("layer-share-1", "layer_share", SPEC | {"layer_share": 1.0}),
    ("layer-score-loss", "layer_score", SPEC | {"layer_score": "loss"}),
    ("nsamples-512", "nsamples", SPEC | {"nsamples": 512}),
    ("metric-activation-ls", "metric", SPEC | {"metric": "activation", "recovery": "least-squares"}),
    ("baseline-wanda-sp", "baseline", SPEC | {"method": "wanda-sp"}),   # the strongest baseline at 20 %, same harness
    ("baseline-flap", "baseline", SPEC | {"method": "flap"}),   # the best seven-task subset average at 20 % (comparison)
    ("width-adaptive", "width", SPEC | {"width_allocation": "adaptive"}),
    ("metric-activation-adaptive", "width", SPEC | {"metric": "activation", "width_allocation": "adaptive"}),
    ("head-share-0.3", "heads", SPEC | {"head_share": 0.3, "head_unit": "kv"}),   # one of SmolLM2's 3 KV groups per kept block
    ("width-adaptive-mlp-norm", "width", SPEC | {"width_allocation": "adaptive", "extra": {"allocation_norm": "mlp"}}),
    # Exact compensation, targets, attention, compensated layers, calibration size. Every row spells
    # out what it changes from the literal spec (so the rows keep their meaning when defaults move).
    ("ls-condition", "ls", SPEC | {"recovery": "least-squares"}),
    ("ls-obs", "ls", SPEC | {"recovery": "least-squares", "metric": "obs"}),
    ("ls-activation", "ls", SPEC | {"recovery": "least-squares", "metric": "activation"}),
    ("obs-mix-0.5", "target", SPEC | LSOBS | {"target_mix": 0.5}),
    ("obs-mix-1", "target", SPEC | LSOBS | {"target_mix": 1.0}),
    ("obs-damp-0.1", "damp", SPEC | LSOBS | {"damp": 0.1}),
    ("obs-damp-0.001", "damp", SPEC | LSOBS | {"damp": 0.001}),
    ("obs-layer-share-0", "layers", SPEC | LSOBS | {"layer_share": 0.0}),
    ("obs-layer-comp", "layers", SPEC | LSOBS | {"layer_compensation": True}),
    ("obs-heads-0.1", "heads", SPEC | LSOBS | {"head_share": 0.1}),
    ("obs-heads-0.25", "heads", SPEC | LSOBS | {"head_share": 0.25}),
    ("obs-tokw", "token-weight", SPEC | LSOBS | {"token_weight": "output"}),
    ("act-ls-tokw", "token-weight", SPEC | {"recovery": "least-squares", "metric": "activation", "token_weight": "output"}),
    ("obs-tokw-128x512", "token-weight", SPEC | LSOBS | {"token_weight": "output", "nsamples": 128, "seqlen": 512}),
    ("obs-tokw-mix-0.5", "token-weight", SPEC | LSOBS | {"token_weight": "output", "target_mix": 0.5}),
    ("obs-tokw-heads-0.1", "token-weight", SPEC | LSOBS | {"token_weight": "output", "head_share": 0.1}),
    ("obs-tokw-layer-share-0", "token-weight", SPEC | LSOBS | {"token_weight": "output", "layer_share": 0.0}),
    # The compensation knobs on the current default: query heads, damping, dense-trajectory mix, compensated block removal.
    # (0.1 removes nothing on SmolLM2: a query head in each of the 3 groups is 221k parameters, 0.1 of a block's
    # share 90k; 0.25 is the smallest step, one of the 3 query heads of every group)
    ("def-heads-0.1", "heads", DEFAULT | {"head_share": 0.1, "head_unit": "query"}),
    ("def-heads-0.25", "heads", DEFAULT | {"head_share": 0.25, "head_unit": "query"}),
    ("def-layer-comp", "layers", DEFAULT | {"layer_share": 0.25, "layer_compensation": True}),
    ("def-damp-0.1", "damp", DEFAULT | {"damp": 0.1}),
    ("def-mix-0.5", "target", DEFAULT | {"target_mix": 0.5}),
    ("def-damp-0.001", "damp", DEFAULT | {"damp": 0.001}),
    # twice the calibration tokens, as longer windows or as more of them (the 5-minute budget allows ~2x)
    ("def-calib-128x256", "calibration", DEFAULT | {"nsamples": 128, "seqlen": 256}),
    ("def-calib-256x128", "calibration", DEFAULT | {"nsamples": 256, "seqlen": 128}),
    # cheap non-uniform widths for the 5-minute default: FLAP's standardised fluctuation ranking across blocks
    ("def-widths-fluct", "width", DEFAULT | {"width_allocation": "adaptive", "extra": {"allocation_score": "fluctuation"}}),
    # widths rounded to a multiple of 32 (llama.cpp's kernels: docs/budgets.md, benchmarks/round_to.py)
    ("def-round-32", "width", DEFAULT | {"round_to": 32}),
    # at 10 % FLAP's and LLM-Pruner's non-uniform widths edge out COMP's uniform ones on the test slice
    ("def-0.1", "ratio", DEFAULT | {"ratio": 0.1}),
    ("def-widths-fluct-0.1", "width", DEFAULT | {"ratio": 0.1, "width_allocation": "adaptive",
                                                 "extra": {"allocation_score": "fluctuation"}}),
    ("baseline-flap-0.1", "baseline", SPEC | {"method": "flap", "ratio": 0.1}),
    # the same pair at 30 %: does the fluctuation ranking's gain at 10 % (and loss at 20 %) follow the ratio?
    ("def-0.3", "ratio", DEFAULT | {"ratio": 0.3}),
    ("def-widths-fluct-0.3", "width", DEFAULT | {"ratio": 0.3, "width_allocation": "adaptive",
                                                 "extra": {"allocation_score": "fluctuation"}}),
    ("search-dp", "search", SPEC | LSOBS | {"token_weight": "output", "width_allocation": "search"}),
    ("search-evo-40", "search", SPEC | LSOBS | {"token_weight": "output", "width_allocation": "search",
                                                "search_generations": 40}),
    ("search-evo-40-ls0", "search", SPEC | LSOBS | {"token_weight": "output", "width_allocation": "search",
                                                    "search_generations": 40, "layer_share": 0.0}),
    # is the evolution converged at 40 generations, and do more fitness tokens generalise better?
    ("search-evo-80-ls0", "search", DEFAULT | {"width_allocation": "search", "search_generations": 80}),
    # search-evo-40-ls0 again, on the host of the two rows above: float rounding differs between CPUs (here AVX2
    # against AVX-512), and the search's trajectory with it, so 40 against 80 generations is compared on one host
    ("search-evo-40-ls0-rerun", "search", DEFAULT | {"width_allocation": "search", "search_generations": 40}),
    ("search-evo-40-ls0-fit32", "search", DEFAULT | {"width_allocation": "search", "search_generations": 40,
                                                     "search_nsamples": 32}),
    ("search-layers-evo-40", "search", SPEC | LSOBS | {"token_weight": "output", "width_allocation": "search",
                                                       "search_generations": 40, "search_layers": True,
                                                       "layer_share": 0.0}),
    ("obs-calib-128x512", "calibration", SPEC | LSOBS | {"nsamples": 128, "seqlen": 512}),
    ("obs-calib-256x512", "calibration", SPEC | LSOBS | {"nsamples": 256, "seqlen": 512}),
    ("obs-calib-64x2048", "calibration", SPEC | LSOBS | {"nsamples": 64, "seqlen": 2048}),
    ("obs-calib-128x2048", "calibration", SPEC | LSOBS | {"nsamples": 128, "seqlen": 2048}),
]
EVAL_SETS = {"wikitext2": ("comp_ablation", "WikiText-2 test"),
             "wikitext2-validation": ("comp_ablation_validation", "WikiText-2 validation (held out)"),
             "c4-validation": ("comp_ablation_c4_validation", "C4 held-out documents (never calibrated on)"),
             "zeroshot-heldout": ("comp_ablation_zeroshot_heldout",
                                  "the seven zero-shot tasks, 200 held-out examples per task (none of them in the "
                                  "comparison's reported subset)")}
ZEROSHOT_N = 200
REFERENCE = "obs-tokw-layer-share-0"  # today's default: the zero-shot table's paired differences are against it


def results_dir(eval_set: str) -> Path:
    return HERE / "results" / EVAL_SETS[eval_set][0]


def run_one(name: str, tokens: int, threads: int, eval_sets=("wikitext2",)):
    """Prune once, evaluate on every set in `eval_sets`, write one row per set."""
    import torch
    torch.set_num_threads(threads)
    import comprune
    from comprune.memory import peak_rss_mb
    overrides = dict(next(c for c in CONFIGS if c[0] == name)[2] or {})
    model, tok = comprune.load("smollm2")
    row = {"name": name, "overrides": overrides, "params": comprune.count_params(model)}
    if name != "dense":
        cfg = comprune.PruneConfig(**{**BASE, **overrides})
        t0 = time.perf_counter()
        calib = comprune.get_calibration(tok, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed)
        # The dense BI pass is identical for every row with the same calibration: reuse it outside the "ratio"
        # rows (whose prune seconds must include it); such rows are marked bi_cached.
        bi_file = RESULTS / f"_bi_scores_{calib.sha256()[:16]}.json"
        group = next(c[1] for c in CONFIGS if c[0] == name)
        reuse = group != "ratio" and cfg.method == "comp" and cfg.layer_score == "bi"
        if reuse and bi_file.exists():
            cfg.extra["layer_scores"] = json.loads(bi_file.read_text())
            row["bi_cached"] = True
        model, rep = comprune.prune(model, tok, cfg, calibration=calib, progress=False, base_model="smollm2")
        row.update(params=rep.params_after, ratio_achieved=rep.ratio_achieved, removed_layers=rep.removed_layers,
                   mlp_width=(rep.mlp_widths[0] if len(set(rep.mlp_widths)) == 1 else
                              f"{min(rep.mlp_widths)}..{max(rep.mlp_widths)}"), mlp_widths=rep.mlp_widths,
                   prune_seconds=round(time.perf_counter() - t0, 1),
                   prune_peak_rss_mb=round(rep.peak_rss_mb), config=rep.config, layer_scores=rep.layer_scores)
        if all("rel_error_tuned" in b for b in rep.blocks.values()):  # COMP rows (baselines keep no MLP error)
            n = len(rep.blocks)
            row.update(mean_rel_error_tuned=sum(b["rel_error_tuned"] for b in rep.blocks.values()) / n,
                       mean_rel_error_pruned=sum(b["rel_error_pruned"] for b in rep.blocks.values()) / n)
        if cfg.layer_score == "bi" and rep.layer_scores and not bi_file.exists():
            RESULTS.mkdir(parents=True, exist_ok=True)
            bi_file.write_text(json.dumps(rep.layer_scores))
    for eval_set in eval_sets:
        out_row = dict(row)
        if eval_set == "zeroshot-heldout":
            from comprune.evaluate.zeroshot import evaluate_zeroshot
            z = evaluate_zeroshot(model, tok, "paper7", subset=ZEROSHOT_N, heldout=True, per_example=True,
                                  progress=False)
            out_row.update(zeroshot_average=z["average"], zeroshot_seconds=z["seconds"], subset_rule=z["subset_rule"],
                           zeroshot={t: {k: v[k] for k in ("metric", "acc", "acc_norm", "n", "doc_ids", "correct")}
                                     for t, v in z["tasks"].items()})
        for seqlen in (128, 2048) if eval_set != "zeroshot-heldout" else ():
            r = comprune.perplexity(model, tok, eval_set, seqlen=seqlen, max_tokens=tokens, progress=False)
            out_row[f"ppl@{seqlen}"] = r["ppl"]
            out_row[f"eval_tokens_per_s@{seqlen}"] = r["tokens_per_second"]
        out_row.update(eval_set=eval_set, eval_tokens=tokens, threads=threads, loadavg=os.getloadavg()[0],
                       peak_rss_mb=round(peak_rss_mb()), finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                       machine=_machine())
        out = results_dir(eval_set)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{name}.json.tmp"
        tmp.write_text(json.dumps(out_row, indent=2) + "\n")
        os.replace(tmp, out / f"{name}.json")
        print(json.dumps({k: out_row[k] for k in out_row if k not in ("config", "layer_scores")}), flush=True)


def _machine() -> dict:
    import platform

    import torch
    flags = ""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags,
            "torch": torch.__version__, "precision": "float32", "threads": torch.get_num_threads()}


def fmt(v, nd=2):
    return f"{v:.{nd}f}" if isinstance(v, float) else ("" if v is None else str(v))


def write_zeroshot_table(only=None):
    """The held-out seven-task rows: average and per task (%), and each row's paired difference to the first."""
    from comprune.evaluate.significance import compare_runs  # the paired test of docs/comparison.md
    rows = [(n, g, json.loads((results_dir("zeroshot-heldout") / f"{n}.json").read_text()))
            for n, g, _ in CONFIGS if (results_dir("zeroshot-heldout") / f"{n}.json").exists()]  # every row so far
    tasks = sorted({t for _, _, r in rows for t in r["zeroshot"]})
    lines = ["# COMP ablations on SmolLM2-135M-Instruct: seven zero-shot tasks, held-out examples", "",
             "Command: `python benchmarks/comp_ablation.py --eval zeroshot-heldout --only <rows>` (one JSON per row in "
             f"`benchmarks/results/{EVAL_SETS['zeroshot-heldout'][0]}/`)  ",
             f"Examples: {ZEROSHOT_N} per task, none of them in the comparison's reported subset "
             f"({rows[0][2]['subset_rule'] if rows else ''}). acc_norm for hellaswag, arc_challenge, openbookqa; acc "
             "otherwise. Calibration as in the other ablation tables.", "",
             "| config | group | params | " + " | ".join(tasks) + f" | average | − {REFERENCE} (pts), 95 % CI, p "
             "| without boolq | − the same, without boolq |",
             "|---|---|---:|" + "---:|" * (len(tasks) + 4)]
    ref = next((r for n, _, r in rows if n == REFERENCE), None)

    def diff(a: dict, b: dict) -> str:
        test = compare_runs(a, b)
        return "" if test is None else "{:+.2f} [{:+.2f}, {:+.2f}], p {:.3f}".format(
            100 * test["average"]["diff"], *(100 * x for x in test["average"]["ci95"]), test["average"]["p"])
    for name, group, r in rows:
        z = r["zeroshot"]
        six = {t: v for t, v in z.items() if t != "boolq"}
        vs = name != REFERENCE and ref is not None
        lines.append(f"| {name} | {group} | {r['params']:,} | " +
                     " | ".join(f"{100 * z[t][z[t]['metric']]:.1f}" for t in tasks) +
                     f" | {100 * r['zeroshot_average']:.2f} | {diff(z, ref['zeroshot']) if vs else ''} "
                     f"| {100 * sum(v[v['metric']] for v in six.values()) / len(six):.2f} "
                     f"| {diff(six, {t: v for t, v in ref['zeroshot'].items() if t != 'boolq'}) if vs else ''} |")
    lines += ["", "BoolQ: the dense model is below its always-\"yes\" rate (62 %), so a pruned model drifting toward "
              "\"yes\" gains there; the columns without it average the other six tasks."]
    (HERE / "results" / f"{EVAL_SETS['zeroshot-heldout'][0]}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_table(tokens: int, eval_set: str = "wikitext2", only=None):
    if eval_set == "zeroshot-heldout":
        return write_zeroshot_table(only)
    rows = []
    for name, group, _ in CONFIGS:
        p = results_dir(eval_set) / f"{name}.json"
        # every row measured so far stays in the table; an --only run adds its rows, finished or not
        if p.exists() or (only and name in only) or (not only and eval_set == "wikitext2"):
            rows.append((name, group, json.loads(p.read_text()) if p.exists() else None))
    flag = "" if eval_set == "wikitext2" else f" --eval {eval_set} --only <rows>"
    lines = ["# COMP ablations on SmolLM2-135M-Instruct" + ("" if eval_set == "wikitext2" else " (held-out validation)"),
             "",
             f"Command: `python benchmarks/comp_ablation.py --tokens {tokens}{flag}`  ",
             "Calibration: C4 sample, 128 x 128 tokens, seed 0 unless the row says otherwise. Evaluation: "
             f"{EVAL_SETS[eval_set][1]}, first {tokens:,} tokens, non-overlapping windows. Every row is ratio 0.2 unless its name says "
             "otherwise, with the overrides its JSON records; most rows vary the literal spec (`--preset comp-spec`: "
             "layer_share 0.25, condition metric, per-neuron scales), the def-* rows today's default (OBS, least "
             "squares, token weights, no block removed: `obs-tokw-layer-share-0`). Rows without numbers did not "
             "finish yet.", "",
             "| config | group | params | ratio | removed layers | MLP width | PPL@128 | PPL@2048 | MLP rel. err (pruned → tuned) | prune s | peak RSS MB |",
             "|---|---|---:|---:|---|---:|---:|---:|---|---:|---:|"]
    for name, group, r in rows:
        if r is None:
            lines.append(f"| {name} | {group} | | | | | | | | | |")
            continue
        err = (f"{r['mean_rel_error_pruned']:.4f} → {r['mean_rel_error_tuned']:.4f}"
               if "mean_rel_error_tuned" in r else "")
        lines.append(f"| {name} | {group} | {r['params']:,} | {fmt(r.get('ratio_achieved'), 4)} | "
                     f"{r.get('removed_layers', '')} | {r.get('mlp_width', '')} | {fmt(r['ppl@128'])} | "
                     f"{fmt(r['ppl@2048'])} | {err} | {fmt(r.get('prune_seconds'), 1)}{'*' if r.get('bi_cached') else ''} | "
                     f"{r.get('prune_peak_rss_mb', r.get('peak_rss_mb'))} |")
    lines += ["", "\\* BI layer scores reused from an earlier run with the same calibration (prune seconds exclude "
              "that dense pass).", "", "Timings are wall-clock on a 2-core CPU that was shared with other jobs (see `loadavg` in each "
              "JSON); quality numbers are unaffected by load."]
    (HERE / "results" / f"{EVAL_SETS[eval_set][0]}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--run", default=None, help="(internal) run one configuration in this process")
    ap.add_argument("--only", default=None, help="comma-separated configuration names")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--eval", default="wikitext2", help="evaluation text(s), comma-separated: " + ", ".join(EVAL_SETS))
    args = ap.parse_args()
    evals = args.eval.split(",")
    if args.run:
        return run_one(args.run, args.tokens, args.threads, evals)
    only = args.only.split(",") if args.only else None
    if not args.table:
        for name in only or [c[0] for c in CONFIGS]:
            if all((results_dir(e) / f"{name}.json").exists() for e in evals):
                continue
            print(f"== {name}", flush=True)
            subprocess.run([sys.executable, __file__, "--run", name, "--tokens", str(args.tokens),
                            "--threads", str(args.threads), "--eval", args.eval], check=False)
    for e in evals:
        write_table(args.tokens, e, only)


if __name__ == "__main__":
    main()
