"""Pruned models against the dense one in llama.cpp, side by side: each model dir exported to GGUF (f16) and timed
alternately with the dense export (prompt processing and greedy generation, median of --repeats runs after a
warm-up each), with the slice perplexity of the pruned model in transformers beside it (the speed target's measure).

    python benchmarks/llamacpp_speedup.py out/comp-20 out/comp-search-20 out/comp-search-speed13

Nothing else should run on the machine meanwhile: llama.cpp's threads spin-wait, so a second job on 2 cores
moves tokens/s by far more than the alternation cancels (the load average before and after is recorded).
Writes benchmarks/results/llamacpp_speedup.json and .md with the command, machine and load.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import comprune  # noqa: E402
from comprune.data import load_ids  # noqa: E402
from comprune.export.gguf import export_gguf  # noqa: E402
from comprune.precision import cpu_name  # noqa: E402
from comprune.export.llamacpp import relative_llamacpp_speed  # noqa: E402
from comprune.stream import resolve_stream_source  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "llamacpp_speedup"


def summary(model_dir: Path) -> dict:
    m = json.loads((model_dir / "pruning.json").read_text())
    cfg = m.get("config", {})
    budget = m.get("target_speedup") or m.get("target_size") or {}
    return {"dir": model_dir.name, "method": m.get("method"), "width_allocation": cfg.get("width_allocation"),
            "ratio": m.get("ratio_achieved"), "params": m.get("params_after"),
            "layers": len(m.get("kept_layers") or []) or None, "mlp_widths": m.get("mlp_widths"),
            "budget": {k: budget.get(k) for k in ("kind", "target", "predicted") if k in budget} or None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dirs", nargs="+", type=Path)
    ap.add_argument("--model", default="smollm2", help="the dense model the pruned ones came from")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ppl-tokens", type=int, default=16384, help="WikiText-2 test tokens for the perplexity (0: skip)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    dense_tok = comprune.load(args.model, dtype="float32")[1]
    prompt = load_ids(dense_tok, "wikitext2")[:128].tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(tmp) / "dense.gguf"
        export_gguf(resolve_stream_source(args.model), dense, "f16")
        for d in args.model_dirs:
            gguf = Path(tmp) / f"{d.name}.gguf"
            exp = export_gguf(d, gguf, "f16")
            speed = relative_llamacpp_speed(gguf, dense, prompt, new_tokens=args.new_tokens, repeats=args.repeats)
            row = {**summary(d), "arch": exp["arch"], "gguf_mib": round(exp["bytes"] / 2**20, 1), **speed}
            if args.ppl_tokens:
                model, tok = comprune.load(str(d), dtype="float32")
                for s in (128, 2048):
                    row[f"ppl{s}"] = comprune.perplexity(model, tok, "wikitext2", seqlen=s, max_tokens=args.ppl_tokens,
                                                         progress=False)["ppl"]
                del model
            rows.append(row)
            print(f"{d.name}: prompt {speed['prompt_relative']:.2f}x, generation {speed['gen_relative']:.2f}x "
                  f"({exp['arch']})", flush=True)
    res = {"command": "python benchmarks/llamacpp_speedup.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
           "load_avg_before": [round(x, 2) for x in load_before],
           "load_avg_after": [round(x, 2) for x in os.getloadavg()],
           "qtype": "f16", "prompt": "first 128 WikiText-2 test tokens", "ppl_tokens": args.ppl_tokens, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {args.out.with_suffix('.md')}")


def markdown(res: dict) -> str:
    r0 = res["rows"][0]
    lines = ["# Pruned models in llama.cpp, side by side with the dense export", "",
             f"Command: `{res['command']}` ({res['date']})", "",
             f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores; 1/5/15-min load average "
             f"{' / '.join(map(str, res['load_avg_before']))} before, {' / '.join(map(str, res['load_avg_after']))} "
             f"after. Runtime: {r0['runtime']}, {r0['threads']} threads, GGUF {res['qtype']}. Each model alternates "
             f"with the dense export run by run: prompt processing of the {res['prompt']}, then {r0['new_tokens']} "
             f"greedy tokens; medians of {r0['repeats']} runs after a warm-up each. PPL: WikiText-2 test, first "
             f"{res['ppl_tokens']:,} tokens, transformers float32.", "",
             "| model | method | widths | ratio | params (M) | budget | arch | MiB | prompt tok/s (dense) | gen tok/s "
             "(dense) | prompt × | gen × | PPL@128 | PPL@2048 |",
             "|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        b = r.get("budget") or {}
        budget = f"{b['kind']} {b['target']} (predicted {b['predicted']:.2f}×)" if b.get("kind") else "ratio"
        w = r.get("mlp_widths") or []
        widths = f"{min(w)}..{max(w)}" if w and min(w) != max(w) else (str(w[0]) if w else "-")
        ppl = [f"{r[k]:.2f}" if r.get(k) else "-" for k in ("ppl128", "ppl2048")]
        lines.append(f"| {r['dir']} | {r['method']} ({r['width_allocation']}) | {widths} | {r['ratio']:.4f} | "
                     f"{r['params'] / 1e6:.2f} | {budget} | {r['arch']} | {r['gguf_mib']} | {r['prompt_tok_s']} "
                     f"({r['reference_prompt_tok_s']}) | {r['gen_tok_s']} ({r['reference_gen_tok_s']}) | "
                     f"{r['prompt_relative']:.2f}× | {r['gen_relative']:.2f}× | {ppl[0]} | {ppl[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
