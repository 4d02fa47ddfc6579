"""Zero-shot accuracy of the dense default model (SmolLM2-135M, float32) with lm-evaluation-harness, offline.

Runs the seven paper tasks on a fixed-seed subset of 200 examples each, then the full sets of the cheaper
tasks (openbookqa, winogrande, piqa, arc_challenge) to show how far the subset is from the full score.
Each task's result is written to benchmarks/results/zeroshot_dense.json (and the .md table redrawn) as soon
as it completes; a re-run skips tasks already in the JSON, and the harness's response cache
(benchmarks/cache/lm_eval, keyed by model+dtype) keeps every scored request, so even an interrupted task
resumes where it stopped and the full sets re-use the subset's answers.

    nohup .venv/bin/python benchmarks/zeroshot_dense.py > benchmarks/results/zeroshot_dense.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # everything is local; fail rather than fetch
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FULL_TASKS = ["openbookqa", "winogrande", "piqa", "arc_challenge"]  # cheapest first
# cheapest first, so an interrupted run still has as many tasks as possible
SUBSET_TASKS = ["winogrande", "openbookqa", "piqa", "arc_easy", "boolq", "arc_challenge", "hellaswag"]


def save(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)  # atomic: an interrupted write never corrupts finished results


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def task_rows(runs: dict, order: list[str]) -> list[str]:
    rows = ["| task | acc | ± | acc_norm | ± | n | paper metric | seconds |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for t in order:
        if t in runs:
            r = runs[t]
            name = f"{t} ≈" if r["approximate"] else t
            rows.append(f"| {name} | {pct(r['acc'])} | {pct(r['acc_stderr'])} | {pct(r['acc_norm'])} | "
                        f"{pct(r['acc_norm_stderr'])} | {r['n']} | {r['metric']} | {r['seconds']:.0f} |")
    return rows


def markdown(out: dict) -> str:
    from comprune.evaluate.zeroshot import PAPER7, paper_average
    sub, full = out["runs"].get(f"subset{out['subset']}", {}), out["runs"].get("full", {})
    lines = [f"# Zero-shot accuracy, dense {out['model']} ({out['dtype']})", "",
             f"Made by: `{out['command']}`  ",
             f"lm-evaluation-harness {out['harness_version']}, torch {out['torch']}, {out['threads']} threads, "
             f"{out['machine']}, batch size {out['batch_size']}; offline task copies of the stock lm_eval configs "
             "(comprune.evaluate.zeroshot). Accuracy in %, ± = standard error. "
             "≈ HellaSwag is approximate: rebuilt from a text extract (see shared/data/hellaswag/README.md).", "",
             f"## Subset: {out['subset']} examples per task ({out['subset_rule']})", ""]
    lines += task_rows(sub, PAPER7)
    if sub:
        avg = paper_average(sub)
        lines += ["", f"Paper average over {len(sub)} task(s) (acc for boolq/piqa/winogrande/arc_easy, acc_norm for "
                  f"hellaswag/arc_challenge/openbookqa): **{pct(avg)}**"]
    lines += ["", "## Full sets", ""] + task_rows(full, FULL_TASKS)
    both = [t for t in FULL_TASKS if t in sub and t in full]
    if both:
        lines += ["", "## Subset vs full (paper metric)", "",
                  "| task | metric | subset | full | subset − full | in subset stderrs |", "|---|---|---:|---:|---:|---:|"]
        for t in both:
            m = sub[t]["metric"]
            d = sub[t][m] - full[t][m]
            se = sub[t][f"{m}_stderr"]
            in_se = f"{d / se:+.2f}" if se else "-"
            lines.append(f"| {t} | {m} | {pct(sub[t][m])} | {pct(full[t][m])} | {100 * d:+.2f} | {in_se} |")
    total = sum(r["seconds"] for run in out["runs"].values() for r in run.values())
    lines += ["", f"Total evaluation time so far: {total / 60:.1f} min (cached requests are not re-scored, so a "
              "full set's time excludes the examples its subset already scored).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--subset", type=int, default=200)
    ap.add_argument("--subset-tasks", default=",".join(SUBSET_TASKS))
    ap.add_argument("--full-tasks", default=",".join(FULL_TASKS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(RESULTS / "zeroshot_dense"), help="output path without extension")
    args = ap.parse_args(argv)

    import comprune
    from comprune.evaluate.zeroshot import evaluate_zeroshot, parse_tasks, harness_version
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    json_path, md_path = Path(args.out + ".json"), Path(args.out + ".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    out = json.loads(json_path.read_text()) if json_path.is_file() else {}
    out.update(model=args.model, dtype=args.dtype, batch_size=args.batch_size, subset=args.subset,
               command="python benchmarks/zeroshot_dense.py " + " ".join(sys.argv[1:] if argv is None else argv),
               harness_version=harness_version(), torch=torch.__version__, threads=torch.get_num_threads(),
               machine=f"{platform.machine()} {os.cpu_count()} cores",
               subset_rule=f"sorted(random.Random(1234).sample(range(n_docs), {args.subset}))")
    out.setdefault("runs", {})
    plan = [(f"subset{args.subset}", t, args.subset) for t in parse_tasks(args.subset_tasks)]
    plan += [("full", t, None) for t in (parse_tasks(args.full_tasks) if args.full_tasks else [])]
    model = tok = None
    for run, task, subset in plan:
        if task in out["runs"].get(run, {}):
            print(f"skip {run}/{task}: already in {json_path}", flush=True)
            continue
        if model is None:
            model, tok = comprune.load(args.model, dtype=args.dtype)
        print(f"{time.strftime('%H:%M:%S')} start {run}/{task}", flush=True)
        r = evaluate_zeroshot(model, tok, [task], subset=subset, batch_size=args.batch_size, progress=True,
                              cache_key=f"{args.model}-dense-{args.dtype}", cache_dir=HERE / "cache" / "lm_eval")
        out["runs"].setdefault(run, {})[task] = {**r["tasks"][task], "seconds": r["seconds"]}
        save(json_path, out)
        md_path.write_text(markdown(out))
        print(f"{time.strftime('%H:%M:%S')} done {run}/{task}: {json.dumps(out['runs'][run][task])}", flush=True)
    md_path.write_text(markdown(out))
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
