"""Recovery stages on models pruned earlier: end-to-end mask tuning (--stage tune) and LoRA distillation (--stage
distill) applied to the SmolLM2 prunes in /work/prunes, with PPL@2048 on the full WikiText-2 test (and validation,
which chooses defaults), the seconds and peak RSS of each stage.

    python benchmarks/recovery.py --row comp-0.20 --stage none      # the pruned model as it is
    python benchmarks/recovery.py --row comp-0.20 --stage tune [--tune-steps N ...]
    python benchmarks/recovery.py --row comp-search-0.20 --stage distill --distill-time 15m

Each (row, stage, tag) is one JSON file in benchmarks/results/recovery/ written as its parts finish (a rerun skips
what is there; the trained model is kept under --models so a killed evaluation does not train again); the
markdown table (recovery.md beside it) is rebuilt from all of them. The calibration windows are the prune's own
(its pruning.json), the early-stopping windows the C4 sample's held-out documents; WikiText-2 is only evaluated.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "recovery"
PRUNES = Path("/work/prunes")
MODELS = Path("/work/recover-models")
SIX = "piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"
PREFIX = {"gemma3-270m": "gemma3"}  # the prune directories' model prefix
DENSE_PPL = {"test": 21.6084, "validation": None}  # fp32, benchmarks/results/ppl_dense.json


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="the dense model (smollm2, gemma3-270m)")
    p.add_argument("--row", required=True, help="a prune under /work/prunes without its model's prefix, e.g. "
                   "comp-0.20 (smollm2-comp-0.20), comp-0.20b (gemma3-comp-0.20b)")
    p.add_argument("--stage", required=True, choices=["none", "tune", "distill"])
    p.add_argument("--tag", default="", help="names a variant's file (e.g. an ablation)")
    p.add_argument("--splits", default="test,validation", help="WikiText-2 splits to evaluate")
    p.add_argument("--ppl-tokens", type=int, default=None,
                   help="evaluate only the first N tokens of each split (ablations; recorded as ppl_SPLIT_N)")
    p.add_argument("--dtype", default="bfloat16",
                   help="precision the models load, train and evaluate in (bfloat16: this host multiplies it natively)")
    p.add_argument("--tune-steps", type=int, default=None)
    p.add_argument("--tune-lr", type=float, default=None)
    p.add_argument("--tune-batch", type=int, default=None)
    p.add_argument("--tune-train", default=None)
    p.add_argument("--tune-bound", type=float, default=None)
    p.add_argument("--tune-time", type=float, default=None, help="seconds")
    p.add_argument("--tune-tokens", type=int, default=None, help="tokens trained on (more than the calibration: C4)")
    p.add_argument("--distill-time", type=float, default=900.0, help="seconds")
    p.add_argument("--distill-tokens", type=int, default=1_000_000)
    p.add_argument("--distill-lr", type=float, default=None)
    p.add_argument("--distill-batch", type=int, default=None)
    p.add_argument("--distill-rank", type=int, default=None)
    p.add_argument("--distill-train", default=None, choices=["lora", "weights"])
    p.add_argument("--distill-seqlen", type=int, default=None, help="window length (default: the calibration's)")
    p.add_argument("--distill-data", default=None, help="what distillation trains on (a source or mix, e.g. "
                   "self:0.5,c4:0.5; default: the calibration windows, then more C4)")
    p.add_argument("--heldout", type=int, default=16)
    p.add_argument("--measures", default="",
                   help="also: chat (the chat measure's test half), chat-heldout, zeroshot (paper7, 200 per task), "
                        "zeroshot-heldout (200 others per task), zeroshot-full (the six tasks without BoolQ, full sets); "
                        "comma-separated")
    p.add_argument("--models", default=str(MODELS))
    p.add_argument("--out", default=str(OUT))
    return p.parse_args()


def write(path: Path, rec: dict):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=2))
    os.replace(tmp, path)


def train(args, src: Path, dst: Path) -> dict:
    """Apply the stage to the prune in `src`, save the result in `dst`; the stage's record."""
    import comprune
    from comprune.data import get_calibration
    from comprune.io import save_pretrained
    from comprune.models import get_adapter
    from comprune.recover import DenseTargets, DistillOptions, TuneOptions, distill, tune
    from comprune.recover.stage import distill_windows, split_windows, training_windows
    manifest = json.loads((src / "pruning.json").read_text())
    c = manifest["calibration"]
    t0 = time.perf_counter()
    dense, tok = comprune.load(args.model, dtype=args.dtype)
    model, _ = comprune.load(str(src), dtype=args.dtype)
    load_s = time.perf_counter() - t0
    calib = get_calibration(tok, c["source"], c["nsamples"], c["seqlen"], c["seed"], model=dense)
    assert calib.sha256() == c["sha256"], "the calibration windows differ from the prune's"
    train_ids, held, what, apart = split_windows(tok, calib, args.heldout, dense)
    adapter = get_adapter(model)
    t1 = time.perf_counter()
    if args.stage == "tune":
        given = {k: getattr(args, f"tune_{k}") for k in ("steps", "lr", "batch", "train", "bound", "time", "tokens")
                 if getattr(args, f"tune_{k}") is not None}
        opts = TuneOptions(**given)
        heldout = DenseTargets.capture(dense, held, opts.batch)
        targets = DenseTargets.capture(dense, training_windows(tok, calib, train_ids, opts.tokens, apart),
                                       opts.batch)
        del dense
        targets_s = time.perf_counter() - t1
        rec = tune(model, adapter, targets, heldout, opts, progress=sys.stderr.isatty())
    else:
        given = {k: getattr(args, f"distill_{k}") for k in ("lr", "batch", "data", "rank", "seqlen", "train")
                 if getattr(args, f"distill_{k}") is not None}
        opts = DistillOptions(tokens=args.distill_tokens, time=args.distill_time, **given)
        heldout = DenseTargets.capture(dense, held, 4)
        ids = distill_windows(dense, tok, calib, train_ids, opts, apart)
        targets_s = time.perf_counter() - t1
        rec = distill(model, adapter, dense, ids, heldout, opts, progress=sys.stderr.isatty())
    rec.update(targets_seconds=round(targets_s, 2), load_seconds=round(load_s, 2), heldout_data=what,
               stage_seconds_total=round(time.perf_counter() - t1, 2))
    save_pretrained(model, tok, dst, {**manifest, "stages": manifest.get("stages", []) + [rec]}, force=True)
    return rec


def evaluate(args, model_dir: Path, split: str) -> dict:
    import comprune
    from comprune.evaluate.perplexity import perplexity
    model, tok = comprune.load(str(model_dir), dtype=args.dtype)
    r = perplexity(model, tok, f"wikitext2-{split}" if split != "test" else "wikitext2", seqlen=2048,
                   max_tokens=args.ppl_tokens, progress=False, compile="auto")
    return {k: r[k] for k in ("ppl", "tokens", "seconds", "dtype", "compiled")}


def measure(args, model_dir, what: str) -> dict:
    """The chat measure (hits and KL against the dense model) or the zero-shot subset of the model in model_dir."""
    import comprune
    from comprune.evaluate.chat import chat_measure, chat_reference
    from comprune.evaluate.zeroshot import evaluate_zeroshot
    model, tok = comprune.load(str(model_dir), dtype=args.dtype)
    heldout = what.endswith("-heldout")
    if what.startswith("chat"):
        split = "heldout" if heldout else "test"
        ref = None
        if str(model_dir) != args.model:
            dense, _ = comprune.load(args.model, dtype=args.dtype)
            ref = chat_reference(dense, tok, split)
        return chat_measure(model, tok, ref, split)
    if what == "zeroshot-full":  # the six tasks without BoolQ, every example (the measure)
        z = evaluate_zeroshot(model, tok, SIX, progress=False, compile="auto")
    else:
        z = evaluate_zeroshot(model, tok, "paper7", subset=200, heldout=heldout, progress=False)
    tasks = {t: {"metric": r["metric"], r["metric"]: r.get(r["metric"])} for t, r in z["tasks"].items()}
    no_boolq = [v[v["metric"]] for t, v in tasks.items() if t != "boolq"]
    return {"average": z["average"], "without_boolq": sum(no_boolq) / len(no_boolq), "tasks": tasks,
            "seconds": z.get("seconds")}


def main():
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = ("" if args.model == "smollm2" else f"{args.model}-") + f"{args.row}+{args.stage}" + (
        f"-{args.tag}" if args.tag else "")
    path = out / f"{name}.json"
    rec = json.loads(path.read_text()) if path.is_file() else {}
    dense = args.row == "dense"
    src = Path(args.model) if dense else PRUNES / f"{PREFIX.get(args.model, args.model)}-{args.row}"
    prune_manifest = {} if dense else json.loads((src / "pruning.json").read_text())
    rec.update(model=args.model, row=args.row, stage=args.stage, tag=args.tag,
               prune_seconds=prune_manifest.get("seconds"), prune_peak_rss_mb=prune_manifest.get("peak_rss_mb"),
               command="python " + " ".join(sys.argv))
    model_dir = src
    if args.stage != "none" and not dense:
        model_dir = Path(args.models) / name
        if "record" not in rec or not (model_dir / "pruning.json").is_file():
            from comprune.memory import peak_rss_mb
            from comprune.precision import host
            rec["record"] = train(args, src, model_dir)
            rec["host"] = host()
            rec["process_peak_rss_mb"] = round(peak_rss_mb(), 1)
            rec["time_vs_prune"] = round(rec["record"]["stage_seconds_total"] / prune_manifest["seconds"], 2)
            write(path, rec)
    for split in args.splits.split(","):
        key = f"ppl_{split}" + (f"_{args.ppl_tokens}" if args.ppl_tokens else "")
        if key not in rec:
            rec[key] = evaluate(args, model_dir, split)
            write(path, rec)
    for what in filter(None, args.measures.split(",")):
        if what not in rec:
            rec[what] = measure(args, model_dir, what)
            write(path, rec)
    write_markdown(out)
    print(json.dumps({k: v for k, v in rec.items() if k != "host"}, indent=1)[:3000])


def _chat(c) -> str:
    if not c:
        return "-"
    return f"{c['hits']}/{c['questions']}" + (f" / {c['kl']:.3f}" if "kl" in c else "")


def _zs(z) -> str:
    return f"{100 * z['without_boolq']:.2f} / {100 * z['average']:.2f}" if z else "-"


def _zs_full(z) -> str:
    return f"{100 * z['average']:.2f}" if z else "-"


def write_markdown(out: Path):
    rows = []
    for p in sorted(out.glob("*.json")):
        r = json.loads(p.read_text())
        st = r.get("record", {})
        ppl = lambda s: f"{r[f'ppl_{s}']['ppl']:.2f}" if f"ppl_{s}" in r else "-"  # noqa: E731
        short = f"{r['ppl_validation_65536']['ppl']:.2f}" if "ppl_validation_65536" in r else "-"
        slice_ = f"{r['ppl_test_16384']['ppl']:.2f}" if "ppl_test_16384" in r else "-"
        model = "" if r.get("model", "smollm2") == "smollm2" else f"{r['model']} "
        rows.append(f"| {model}{r['row']} | {r['stage']}{' (' + r['tag'] + ')' if r['tag'] else ''} | {ppl('test')} | "
                    f"{slice_} | {ppl('validation')} | {short} | {st.get('steps', '-')} | {st.get('tokens', '-')} | "
                    f"{(format(st['kl_before'], '.4f') + ' → ' + format(st['kl_after'], '.4f')) if st else '-'} | "
                    f"{st.get('stage_seconds_total', 0):.0f} | {r['prune_seconds'] or 0:.0f} | "
                    f"{r.get('time_vs_prune', '-')} | {r.get('process_peak_rss_mb', '-')} | {st.get('stopped', '-')} | "
                    f"{_chat(r.get('chat'))} | {_chat(r.get('chat-heldout'))} | {_zs(r.get('zeroshot'))} | "
                    f"{_zs(r.get('zeroshot-heldout'))} | {_zs_full(r.get('zeroshot-full'))} |")
    text = ("# Recovery stages on SmolLM2-135M-Instruct and Gemma 3 270M prunes\n\n"
            "Made by `benchmarks/recovery.py` (one JSON per row beside this file, with its command and host). "
            "PPL@2048 on the full WikiText-2 test and validation sets, in bfloat16 (the stages train in it too); dense "
            "test PPL 21.61 (float32), the untuned prunes' 43.48 (COMP) and 39.87 (comp-search) (docs/comparison.md, "
            "the same windows). Held-out KL: "
            "KL(dense ‖ model) per token on 16 windows of the C4 sample's held-out documents, before → after the "
            "stage. Chat: exact-answer hits and KL(dense ‖ model) in nats/token on the dense model's greedy answers "
            "(comprune.evaluate.chat). Zero-shot: the paper7 tasks, 200 examples per task (the reported subset of "
            "docs/comparison.md; held-out: 200 others per task), acc_norm for HellaSwag, ARC-c and OBQA, acc "
            "otherwise, in %. Seconds: the stage with its dense targets (not the models' loading); prune seconds from the "
            "prune's pruning.json; peak RSS of the whole benchmark process (dense and pruned model loaded).\n\n"
            "| prune | stage | PPL test | PPL test, first 16,384 | PPL validation | PPL validation, first 65,536 | steps | tokens | held-out KL | "
            "stage s | prune s | × prune | peak RSS MB | stopped | chat hits / KL (test half) | chat (held-out half) | "
            "0-shot w/o BoolQ / 7-task (subset) | 0-shot (held-out subset) | 0-shot, six tasks, full sets |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    (out.parent / "recovery.md").write_text(text)


if __name__ == "__main__":
    main()
