"""COMP vs the baselines on SmolLM2-135M-Instruct at 10/20/30 % (docs/comparison.md).

    nohup .venv/bin/python benchmarks/compare.py > benchmarks/results/compare/run.log 2>&1 &
    .venv/bin/python benchmarks/compare.py --doc-only      # rewrite docs/comparison.md from what is done

Same as `comprune compare smollm2 --ratios 0.1,0.2,0.3 --methods comp,llm-pruner,flap,layer-drop,wanda-sp
--out benchmarks/results/compare --max-tokens 16384 --speed-tokens 32 --zeroshot-cache-dir benchmarks/cache/lm_eval`, plus the
docs page. Resumable: every method x ratio result is written under benchmarks/results/compare/runs/ as it
completes and a rerun skips finished ones (including zero-shot answers already in the lm_eval cache).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "compare"
OFFICIAL = HERE / "results" / "official" / "summary.md"


def official_table() -> list[str]:
    """The official-code rows beside their harness counterparts (benchmarks/official/summary.py's table)."""
    if not OFFICIAL.exists():
        return []
    table = [line for line in OFFICIAL.read_text().splitlines() if line.startswith("|")]
    return ["Official code against the harness, SmolLM2, first 32,768 WikiText-2 test tokens (a harness row's "
            "brackets: its change against the official row above it; each official row uses its own recipe and "
            "calibration draw, the harness rows the shared calibration set unless they say otherwise):", "",
            *table, ""]
DOC = ROOT / "docs" / "comparison.md"
METHODS = "comp,comp-search,wanda-sp,flap,llm-pruner,layer-drop"


def command_line(args) -> str:
    return (f"python benchmarks/compare.py --model {args.model} --ratios {args.ratios} --methods {args.methods} "
            f"--max-tokens {args.max_tokens} --subset {args.subset} --speed-tokens {args.speed_tokens}"
            + f" --full-seqlens {args.full_seqlens}" + (" --zeroshot-full" if args.zeroshot_full else "") + (f" --dtype {args.dtype}"
                                                                     if args.dtype != "float32" else ""))


def write_doc(args):
    res_path = Path(args.out) / "results.json"
    if not res_path.is_file():
        print(f"no results yet in {args.out}", file=sys.stderr)
        return
    res = json.loads(res_path.read_text())
    table = (Path(args.out) / "results.md").read_text()
    # docs/comparison.md is the default comparison's page; another --out (e.g. compare_auto, another precision)
    # gets its page beside its results instead of overwriting it
    main_doc = Path(args.out).resolve() == OUT.resolve()
    doc = DOC if main_doc else Path(args.out) / "comparison.md"
    doc.parent.mkdir(exist_ok=True)
    png = Path(args.out) / "results.png"
    if png.is_file() and main_doc:
        shutil.copyfile(png, DOC.parent / "comparison.png")
    try:
        rel_out = Path(args.out).resolve().relative_to(ROOT)
    except ValueError:
        rel_out = Path(args.out)
    rows = res["rows"]
    done = {(r["method"], r["ratio"]) for r in rows if r.get("ppl128") is not None}
    expected = {(m, float(x)) for m in args.methods.split(",") for x in args.ratios.split(",")}
    missing = sorted(expected - done)
    import torch
    import transformers
    lines = [
        "# COMP vs baselines on SmolLM2-135M-Instruct",
        "",
        "Every method prunes the same model with the same calibration windows (C4 sample, 128 × 128 tokens, seed 0; "
        "the sha256 of the token ids is recorded in every manifest and checked to be identical), each in its own "
        "process (`python -m comprune.cli prune ... --json`), so pruning time and peak RSS are per method. "
        "Evaluation is identical for all: WikiText-2 raw test perplexity on the first "
        f"{res['settings']['ppl_max_tokens']:,} tokens of the test stream (non-overlapping windows of 128 and 2048), "
        "the full test set at 20 %, the seven-task zero-shot average (BoolQ, PIQA, HellaSwag≈, WinoGrande, ARC-e, "
        "ARC-c, OBQA; acc/acc_norm as in the LLM-Pruner/FLAP/COMP tables) on the fixed 200-example subset at 20 %, "
        "and greedy generation speed (32 new tokens, batch 1, KV cache) relative to the dense model, measured "
        "alternately with it, in transformers and in llama.cpp (the model's GGUF f16 export run by xllamacpp: "
        "prompt processing of the first 128 WikiText-2 test tokens and generation, alternating with the dense "
        "export run by run).",
        "",
        "Made by:",
        "",
        "```",
        command_line(args) + ("" if main_doc else f" --out {rel_out}"),
        "```",
        "",
        f"(= `comprune compare {args.model} --ratios {args.ratios} --methods {args.methods} --max-tokens "
        f"{args.max_tokens} --speed-tokens {args.speed_tokens} --zeroshot-cache-dir benchmarks/cache/lm_eval "
        f"--out {rel_out}`). Raw results: `{rel_out}/results.json`, one file per run in `{rel_out}/runs/`, "
        "prune logs in `.../logs/`.",
        "",
        f"Machine: {machine_line(res['settings'])}, shared with other work during the "
        f"run (see the caveats; relative speeds are measured alternately with the dense model to cancel drift), "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{res['settings'].get('dtype', 'float32')}.",
        "",
        "## Results",
        "",
        table.strip(),
        "",
        f"![quality vs ratio, pruning time and memory]({'comparison.png' if main_doc else 'results.png'})",
        "",
    ]
    if missing:
        lines += ["Not measured yet (the run is resumable; rerun the command above): "
                  + ", ".join(f"{m} {100 * r:.0f} %" for m, r in missing) + ".", ""]
    lines += standing(res)
    lines += [
        "Caveats of this run: the machine's 2 cores were shared with other work for most of it (see each run's "
        "load in its JSON), so pruning seconds and tokens/s are inflated and noisy; quality numbers are "
        "unaffected. Generation speed in transformers is eager `generate` at batch 1, dominated by per-operation "
        "overhead; the deployment figure is the llama.cpp column (GGUF f16 via xllamacpp, alternated with the "
        "dense export run by run). Peak RSS is each pruning process's own high-water mark (wait4's ru_maxrss "
        "through a small launcher process, or its VmHWM if larger); an in-memory prune pays the runtime floor "
        f"({res.get('runtime_floor_mb') or 0:.0f} MB) before its own work. The full-test-set perplexity is at "
        f"window length {', '.join(str(x) for x in res['settings'].get('full_seqlens', [2048]))} only for the "
        "pruned models (the dense row's other length comes from benchmarks/results/ppl_dense.json).",
        "",
        "## How each baseline is run (same harness as COMP)",
        "",
        "Each harness baseline is checked against its authors' code on the same model and slice in "
        "[baselines.md](baselines.md) (`benchmarks/official/`, rows in `benchmarks/results/official/summary.md`).",
        "",
        *official_table(),
        "- **comp**: COMP with comprune's default (`--method comp`, [method.md](method.md), chosen on held-out "
        "validation in [ablation.md](ablation.md)): every block kept at 20 % (layer share 0, the held-out winner; "
        "COMP's hybrid split is `--layer-share 0.25`), MLP neurons chosen by structured OBS (the condition score "
        "with the kept columns updated after every removal), each token weighted by its block output's scale, "
        "and the kept down_proj refitted by damped least squares on the already-pruned prefix's inputs, folded "
        "into the weights. Uniform widths.",
        "- **comp-search** (`--preset comp-search`): the same per-block machinery with per-block widths chosen by "
        "an evolutionary search (80 generations, chosen over 40 on held-out text: [ablation.md](ablation.md)) "
        "against KL(dense ‖ pruned) on calibration-source windows held "
        "apart from the calibration windows (methods/search/). It streams as the walk does (`--stream`: a block "
        "is read from the shards whenever the database, the error curves or a generation needs it), and its "
        "weights equal the in-memory prune's (tests/test_stream.py; measured with the 40-generation preset on "
        "SmolLM2 at 20 %: the same sha256, 1,246 s quiet against 805 s, 1,168 MB peak RSS against 1,931; the "
        "80-generation rows were not streamed again). "
        "On a quiet 2-core AMD EPYC (Zen 5) the whole prune (variant database, DP start, 80 generations) takes "
        "813 s at 20 % in float32; a second heavy job on the same 2 cores makes a generation 4x slower (OpenMP "
        "threads spin-wait), so the prune seconds of a shared run mean little. Float rounding differs between "
        "CPUs, so another host's search picks other widths of similar quality (docs/ablation.md). The comp-search "
        "rows were measured on that Zen 5 host (2026-12-06), the other rows on an AVX2 AMD EPYC (2026-12-05); "
        "every speed is relative to the dense model measured alternately with it on the same host.",
        "- **llm-pruner**: block-wise first-order Taylor importance |W ⊙ ∂L/∂W| (one backward pass of the LM loss "
        "on the first 10 calibration windows cut to 64 tokens, gradients for every parameter as LLM-Pruner does) "
        "summed over coupled groups: a KV head with its query heads (q/k/v rows + o columns; GQA-aware) and an MLP "
        "channel (gate/up rows + down column). Uniform ratio over the middle blocks (4–27 of 30: LLM-Pruner's "
        "4–29 of 32 scaled), no LoRA. SmolLM2 has only 3 KV heads per block, so the attention part is rounded "
        "to whole groups (0 of 3 at 10 %, 1 of 3 at 20–30 %) and the MLP share fills the rest of the budget.",
        "- **flap**: fluctuation metric Var(X_j)·‖W_:,j‖² on the inputs of o_proj (squared, as FLAP's code does) "
        "and down_proj from one dense pass, standardised per module, one global ranking of KV groups and MLP "
        "channels across all blocks (a group costs its parameter count, 170.7 MLP channels here), at least one "
        "group and one channel kept per block; bias compensation b = W[:, removed]·mean(X[:, removed]) stored as "
        "real biases (Llama's `attention_bias`/`mlp_bias`; zero q/k/v/gate/up biases; counted in the parameters). "
        "The paper calibrates on 1024 × 128 tokens; here it gets the same 128 × 128 as every method.",
        "- **layer-drop** (ShortGPT): remove the k = round(ratio · params / block params) lowest-BI blocks "
        "(never the first or last). One block is 2.6 % of SmolLM2, so the achieved ratio differs from the request "
        "(see the ratio column).",
        "- **wanda-sp**: S_j = mean_i |W_ij| · ‖X_:,j‖ on the down_proj inputs, uniform per layer, sequential "
        "(each block sees the already-pruned blocks), no compensation, no attention pruning.",
        "",
        "Ratios are fractions of all parameters (embeddings included, tied once). Every method but layer-drop "
        "lands within 0.5 % of the request.",
        "",
    ]
    doc.write_text("\n".join(lines))
    print(f"wrote {doc}")


def machine_line(settings: dict) -> str:
    """The machine the results were measured on, as recorded by the run (this host only for older results that
    recorded none: then said so)."""
    from comprune import precision

    m = settings.get("machine")
    if m:
        return f"{m.get('arch', 'x86_64')} CPU ({m['cpu']}), {m['cores']} cores (recorded by the run)"
    return (f"{platform.machine()} CPU ({precision.cpu_name()}), {os.cpu_count()} cores (the host that wrote this "
            "page: the run recorded no machine)")

def standing(res) -> list[str]:
    """Where COMP stands against each baseline at the headline ratio: quality deltas and pruning memory,
    computed from the results (nothing typed in by hand)."""
    ratio = res["settings"].get("zeroshot_ratio")
    rows = {r["method"]: r for r in res["rows"] if r["method"] != "dense" and abs(r["ratio"] - (ratio or -1)) < 1e-9}
    comp = rows.get("comp")
    if comp is None:
        return []
    metrics = [("ppl128", "PPL@128 (slice)", True), ("ppl2048", "PPL@2048 (slice)", True),
               ("ppl128_full", "PPL@128 (full test)", True), ("ppl2048_full", "PPL@2048 (full test)", True),
               ("avg7", "7-task average (subset)", False), ("avg7_full", "7-task average (full sets)", False)]
    out = [f"## Where COMP stands at {100 * ratio:.0f} %", "",
           "| baseline | " + " | ".join(m[1] for m in metrics) + " | pruning peak RSS |",
           "|---|" + "---:|" * (len(metrics) + 1)]
    for name, r in rows.items():
        if name == "comp":
            continue
        cells = []
        for key, _, lower_better in metrics:
            a, b = comp.get(key), r.get(key)
            if a is None or b is None:
                cells.append("-")
                continue
            if lower_better:
                rel = 100 * (a / b - 1)
                cells.append(f"{'**ahead**' if a < b else 'behind'} ({rel:+.1f} %)")
            else:
                word = "level" if abs(a - b) < 5e-5 else "**ahead**" if a > b else "behind"
                cells.append(f"{word} ({100 * (a - b):+.2f} pts)")
        mem = [comp.get("peak_rss_mb"), comp.get("stream_peak_rss_mb"), r.get("peak_rss_mb")]
        cells.append("-" if mem[2] is None or mem[0] is None else
                     f"COMP {mem[0] / mem[2]:.2f}× in memory" + ("" if mem[1] is None else f", {mem[1] / mem[2]:.2f}× streamed"))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    se = avg_stderr(Path(res.get("out", OUT)) / "runs" / f"comp-r{ratio:.2f}.json")
    if se:
        out += ["", f"The 7-task averages come from 200 examples per task: the standard error of one average is "
                f"about {100 * se:.1f} points (from lm-eval's per-task stderr), so differences of a point or two "
                "in that column are not resolved by this subset. Perplexity is deterministic on fixed tokens, but a "
                "difference of a few percent on the 16k-token slice can move with the choice of text: the full-test "
                "columns settle those."]
    floor = res.get("runtime_floor_mb")
    sfloor = res.get("stream_runtime_floor_mb") or floor
    lp = rows.get("llm-pruner", {}).get("peak_rss_mb")
    if floor and lp and comp.get("stream_peak_rss_mb"):
        above = comp["stream_peak_rss_mb"] - sfloor
        out += ["", f"Pruning memory above the runtime floor (python, torch and transformers imported, the model's "
                f"skeleton built, no weights: {floor:.0f} MB with transformers' model classes, {sfloor:.0f} MB with "
                "the plain-PyTorch modules a streamed prune uses), which is what a GPU memory figure such as the "
                f"paper's would count: COMP streamed {above:.0f} MB, COMP in memory "
                f"{comp['peak_rss_mb'] - floor:.0f} MB, LLM-Pruner {lp - floor:.0f} MB "
                f"(COMP streamed / LLM-Pruner = {above / (lp - floor):.2f})."]
    return out + [""]


def avg_stderr(run_path: Path) -> float | None:
    """Standard error of the seven-task average: sqrt(sum of the tasks' squared stderrs) / 7."""
    if not run_path.is_file():
        return None
    tasks = json.loads(run_path.read_text()).get("zeroshot", {}).get("tasks", {})
    errs = [t.get(f"{t.get('metric', 'acc')}_stderr") for t in tasks.values()]
    if not errs or any(e is None for e in errs):
        return None
    return sum(e * e for e in errs) ** 0.5 / len(errs)


def reuse_dense_results(out: Path, model: str, subset: int, dtype: str = "float32"):
    """The dense model's full-test-set perplexity and zero-shot subset scores are the same measurements that
    benchmarks/ppl_dense.py and benchmarks/zeroshot_dense.py make in float32 (same evaluator, data, subset rule),
    and benchmarks/speed_probe.py --max-tokens 0 makes in auto precision (results/eval_speed_amx_full.json, a
    bfloat16 host): copy those of the comparison's precision into its dense run instead of spending ~45 min
    recomputing them. Each copied entry names its source; entries copied earlier from another precision's
    source are dropped (a comparison never mixes precisions)."""
    if model != "smollm2":
        return
    path = out / "runs" / "dense.json"
    rec = json.loads(path.read_text()) if path.is_file() else {"method": "dense", "ratio": 0.0}
    sources = {"float32": ("ppl_dense.json", "zeroshot_dense.json")}
    probe = HERE / "results" / "eval_speed_amx_full.json"
    if probe.is_file():
        sources.setdefault(json.loads(probe.read_text())["precision"]["dtype"], (probe.name, None))
    if dtype == "auto":  # what the comparison will run in here (the runner makes the same choice)
        from comprune import precision
        dtype = precision.choose().dtype
    ppl_name, zs_name = sources.get(dtype, (None, None))
    changed = False
    for key, r in list(rec.get("ppl", {}).items()):
        if r.get("source") and r["source"] != f"benchmarks/results/{ppl_name}":
            del rec["ppl"][key]
            changed = True
    if rec.get("zeroshot", {}).get("source") and rec["zeroshot"]["source"] != f"benchmarks/results/{zs_name}":
        del rec["zeroshot"]
        changed = True
    ppl_src = HERE / "results" / ppl_name if ppl_name else None
    if ppl_src is not None and ppl_src.is_file():
        found = json.loads(ppl_src.read_text())
        runs = found["rows"] if "rows" in found else [r for k, r in found.items() if k.startswith("seqlen_")]
        for r in runs:
            if r.get("max_tokens") in (None, 0) and f"wikitext2@{r['seqlen']}/full" not in rec.get("ppl", {}):
                keep = ("dataset", "seqlen", "max_tokens", "windows", "tokens", "ppl", "seconds", "tokens_per_second",
                        "steady_tokens_per_second", "compiled", "dtype")
                rec.setdefault("ppl", {})[f"wikitext2@{r['seqlen']}/full"] = {
                    **{k: r[k] for k in keep if k in r}, "source": f"benchmarks/results/{ppl_name}"}
                changed = True
    zs_src = HERE / "results" / zs_name if zs_name else None
    if zs_src is not None and zs_src.is_file() and "zeroshot" not in rec:
        zs = json.loads(zs_src.read_text())
        tasks = zs.get("runs", {}).get(f"subset{subset}", {})
        if zs.get("subset") == subset and len(tasks) == 7:
            from comprune.evaluate.zeroshot import average_note, paper_average
            names = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
            rec["zeroshot"] = {"harness_version": zs["harness_version"], "tasks": {t: tasks[t] for t in names},
                               "average": paper_average(tasks), "average_metric_note": average_note(names),
                               "subset": subset, "subset_rule": zs["subset_rule"], "limit": None,
                               "seconds": round(sum(t.get("seconds", 0) for t in tasks.values()), 1),
                               "source": f"benchmarks/results/{zs_name}"}
            changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--ratios", default="0.1,0.2,0.3")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--speed-tokens", type=int, default=32)
    ap.add_argument("--subset", type=int, default=200)
    ap.add_argument("--skip", default="")
    ap.add_argument("--full-seqlens", default="2048",
                    help="window lengths of the full-test-set perplexity (default 2048, the headline length: the "
                         "full set costs ~18x the slice, ~15 min a model per length on an AVX2 host)")
    ap.add_argument("--redo", default="", help="stages to measure again: prune (time, memory), speed, llamacpp, stream (the streamed prune)")
    ap.add_argument("--redo-tag", default=None, help="name of the --redo pass (resume it with the same tag)")
    ap.add_argument("--dtype", default="float32",
                    help="float32 (default: the precision the recorded results were made in; a results directory "
                         "never mixes precisions), or auto / bfloat16 with another --out")
    ap.add_argument("--zeroshot-full", action="store_true",
                    help="also the seven tasks' full sets for dense and every method at 20 %% (hours; resumable per "
                         "task and method)")
    ap.add_argument("--keep-models", action="store_true", help="keep the pruned model directories (out/models/)")
    ap.add_argument("--doc-only", action="store_true", help="only rewrite docs/comparison.md from the results")
    args = ap.parse_args(argv)
    if not args.doc_only:
        sys.path.insert(0, str(ROOT / "src"))
        from comprune.compare import compare
        reuse_dense_results(Path(args.out), args.model, args.subset, args.dtype)
        compare(args.model, [float(x) for x in args.ratios.split(",")], args.methods.split(","), args.out,
                ppl_max_tokens=args.max_tokens, zeroshot_subset=args.subset, speed_tokens=args.speed_tokens,
                zeroshot_cache_dir=str(HERE / "cache" / "lm_eval"),
                skip=[s for s in args.skip.split(",") if s], redo=[s for s in args.redo.split(",") if s],
                redo_tag=args.redo_tag, zeroshot_full=args.zeroshot_full, dtype=args.dtype,
                full_seqlens=[int(x) for x in args.full_seqlens.split(",")], keep_models=args.keep_models)
    write_doc(args)


if __name__ == "__main__":
    main()
