"""Gemma 3 270M, a second real model: prune 20 % of its blocks' parameters (--ratio-of blocks; embeddings are
~63 % of the model) with COMP and the baselines, and record WikiText-2 perplexity before/after on a fixed slice,
pruning time and peak RSS, and the GGUF in llama.cpp (tokens/s against the dense model's GGUF, greedy text).

Each method runs in its own process (so peak RSS is that method's), on the same calibration windows.

    nice -n 19 .venv/bin/python benchmarks/gemma3.py                       # every method
    nice -n 19 .venv/bin/python benchmarks/gemma3.py --methods comp wanda-sp --ppl-tokens 8192

Needs the optional Gemma 3 wheels (`make gemma3`). Writes benchmarks/results/gemma3.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import comprune  # noqa: E402
from comprune.data import get_calibration  # noqa: E402
from comprune.export.gguf import export_gguf  # noqa: E402
from comprune.export.llamacpp import complete, llamacpp_server  # noqa: E402
from comprune.memory import peak_rss_mb  # noqa: E402
from gguf_speed import PROMPT, measure_speed  # noqa: E402

SPEC = "gemma3-270m"
METHODS = ["comp", "wanda-sp", "flap", "layer-drop", "llm-pruner"]


def greedy_text(server, tokenizer, prompt="The capital of France is", n=48) -> str:
    ids = tokenizer(prompt).input_ids  # with <bos>: Gemma expects it
    out = complete(server, {"prompt": ids, "n_predict": n, "temperature": 0, "cache_prompt": False})
    return prompt + out["choices"][0]["text"]


def llamacpp_row(model_dir: Path, tokenizer, args) -> dict:
    path = Path(args.work) / f"{model_dir.name}-{args.qtype}.gguf"
    info = export_gguf(model_dir, path, args.qtype, force=True)
    server = llamacpp_server(path, n_ctx=1024, threads=args.threads)
    prompt_ids = tokenizer(PROMPT).input_ids
    row = {"gguf_arch": info["arch"], "gguf_mib": round(info["bytes"] / 2**20, 1), "gguf_export_s": info["seconds"]}
    row.update(measure_speed(server, prompt_ids, args.new_tokens, args.repeats))
    row["greedy"] = greedy_text(server, tokenizer)
    del server
    path.unlink(missing_ok=True)
    return row


def run_one(method: str | None, args) -> dict:
    """One process: load, (prune,) perplexity, save, GGUF in llama.cpp. method None = the dense model."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = comprune.load(SPEC)
    load_s = time.perf_counter() - t0
    row = {"method": method or "dense", "load_s": round(load_s, 1), "params": comprune.count_params(model)}
    if method is not None:
        cfg = comprune.PruneConfig(ratio=args.ratio, ratio_of="blocks", method=method, seed=0, nsamples=args.nsamples)
        calib = get_calibration(tok, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed)
        model, report = comprune.prune(model, tok, cfg, calibration=calib, progress=False, base_model=SPEC)
        row.update({"prune_s": round(report.seconds, 1), "peak_rss_mb": round(report.peak_rss_mb),
                    "ratio_of_blocks": round(report.ratio_achieved, 4),
                    "ratio_of_all": round(1 - report.params_after / report.params_before, 4),
                    "params_after": report.params_after, "removed_layers": report.removed_layers,
                    "mlp_widths": sorted(set(report.mlp_widths)),
                    "heads": sorted(set(model.config.to_dict().get("num_attention_heads_per_layer")
                                        or [model.config.num_attention_heads])),
                    "calibration": report.calibration})
    # comprune's evaluator starts every Gemma window with <bos> (<bos> + seqlen-1 text tokens)
    ppl = comprune.perplexity(model, tok, "wikitext2", seqlen=args.seqlen, max_tokens=args.ppl_tokens, progress=False)
    assert ppl["bos"]
    row["wikitext2_ppl"] = round(ppl["ppl"], 3)
    row["ppl_tokens"], row["ppl_s"] = ppl["scored_tokens"], round(ppl["seconds"], 1)
    out = Path(args.work) / f"gemma3-270m-{row['method']}"
    if method is None:
        out = comprune.loading.embedded_cached_dir(SPEC)
    else:
        comprune.save_pretrained(model, tok, out, report, force=True)
    del model
    if args.qtype != "none":
        try:
            row.update(llamacpp_row(out, tok, args))
        except comprune.CompruneError as e:  # e.g. per-layer widths, which llama.cpp's gemma3 arch cannot hold
            row["gguf_refused"] = str(e).split(":")[0] + ": per-layer widths are not in llama.cpp's gemma3 arch" \
                if "per-layer" in str(e) else str(e)
    row["process_peak_rss_mb"] = round(peak_rss_mb())
    return row


def write_markdown(path: Path, result: dict) -> None:
    s = result["settings"]
    rows = result["rows"]
    dense = next((r for r in rows if r["method"] == "dense"), {})
    lines = ["# Gemma 3 270M: COMP and the baselines at 20 % of the blocks' parameters", "",
             f"Command: `{result['command']}`", "",
             f"Model: `{SPEC}` (Q4_K_M GGUF from the PyPI wheels, dequantised to float32 safetensors; "
             f"{dense.get('params', '?'):,} parameters, embeddings ~63 %). Pruning: `--ratio {s['ratio']} --ratio-of "
             f"blocks`, default settings otherwise (calibration {rows[-1].get('calibration', {}).get('source', 'c4')}, "
             f"{s['nsamples']} x 128 tokens). Perplexity: WikiText-2 test, first "
             f"{s['ppl_tokens']} tokens in windows of <bos> + {s['seqlen'] - 1} tokens (Gemma needs its <bos>; "
             "transformers, float32). llama.cpp: xllamacpp "
             f"{result['runtime_version']}, GGUF {s['qtype']}, {s['threads']} threads, {s['new_tokens']} new tokens "
             f"greedy, median of {s['repeats']} after a warm-up. Machine: {result['machine']}, shared: 1-min load "
             f"{result['load_avg_1min']['before']} before / {result['load_avg_1min']['after']} after, so times and "
             "tokens/s are noisy; each row's speed is against the dense GGUF measured in the same run.", "",
             "| method | removed (blocks / all) | layers removed | MLP widths | heads | WikiText-2 PPL | prune s "
             "| peak RSS MB | GGUF MiB | gen tok/s | vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = r.get("gen_tok_s")
        ref = r.get("dense_gen_tok_s") or dense.get("gen_tok_s")
        rel = f"{speed / ref:.2f}x" if speed and ref else "-"
        removed = f"{r['ratio_of_blocks']:.3f} / {r['ratio_of_all']:.3f}" if "ratio_of_blocks" in r else "-"
        w = r.get("mlp_widths", [2048])
        w = f"{w[0]}..{w[-1]} ({len(w)} widths)" if len(w) > 3 else w
        lines.append(f"| {r['method']} | {removed} | {r.get('removed_layers', '-')} | {w} "
                     f"| {r.get('heads', [4])} | {r['wikitext2_ppl']} | {r.get('prune_s', '-')} "
                     f"| {r.get('peak_rss_mb', r.get('process_peak_rss_mb'))} | {r.get('gguf_mib', '-')} "
                     f"| {speed or r.get('gguf_refused', '-')} | {rel} |")
    lines += ["", "Greedy continuations in llama.cpp:", ""]
    lines += [f"- {r['method']}: {r.get('greedy', '-')!r}" for r in rows]
    if result.get("skipped"):
        lines += ["", f"Not run: {', '.join(result['skipped'])} ({result.get('skip_reason', '')})."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows of 128 tokens")
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--qtype", default="q8_0", choices=["f16", "q8_0", "f32", "none"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "gemma3")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gemma3")
    ap.add_argument("--keep-others", action="store_true",
                    help="keep the rows of methods not run now from the existing JSON (same settings)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one method ("dense")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(run_one(None if args.one == "dense" else args.one, args)))
        return
    import xllamacpp
    load_before = os.getloadavg()[0]
    comprune.load(SPEC)  # builds the safetensors cache once, outside the timed children
    rows, skipped = [], []
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    previous = args.out.with_suffix(".json")
    if args.keep_others and previous.exists():  # rows of methods not run now stay (same settings required)
        old = json.loads(previous.read_text())
        if {k: v for k, v in old["settings"].items() if k not in ("methods", "keep_others")} != \
                {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k not in ("one", "methods", "keep_others")}:
            sys.exit(f"--keep-others: {previous} was made with other settings; run every method instead")
        old_dense = next((r for r in old["rows"] if r["method"] == "dense"), {})
        rows = [r for r in old["rows"] if r["method"] not in {"dense", *args.methods}]
        for r in rows:  # speeds compare within a run: each row keeps the dense speed measured beside it
            r.setdefault("dense_gen_tok_s", old_dense.get("gen_tok_s"))
    run_dense = None
    for method in ["dense"] + args.methods:
        print(f"== {method}", flush=True)
        proc = subprocess.run([sys.executable, __file__, *base, "--one", method], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:])
            skipped.append(method)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        run_dense = row if method == "dense" else run_dense
        row["dense_gen_tok_s"] = run_dense.get("gen_tok_s") if run_dense else None
        rows = sorted(rows + [row], key=lambda r: r["method"] != "dense")
        print(json.dumps({k: v for k, v in row.items() if k != "calibration"}), flush=True)
        result = {"command": " ".join(["python benchmarks/gemma3.py", shlex.join(base)]).strip(),
                  "runtime_version": xllamacpp.__version__, "torch": torch.__version__,
                  "transformers": __import__("transformers").__version__,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                  "load_avg_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "precision": "float32",
                  "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                               if k != "one"},
                  "rows": rows, "skipped": skipped}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        write_markdown(args.out.with_suffix(".md"), result)  # after every method: a partial run leaves results
    print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
