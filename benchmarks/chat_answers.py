"""Greedy chat answers of the dense model beside pruned ones: the five prompts of comprune.evaluate.chat, through
the tokenizer's chat template, 40 new tokens, no sampling.

    python benchmarks/chat_answers.py --models OUT1,OUT2        # pruned model directories (pruning.json inside)
    python benchmarks/chat_answers.py --prune comp              # prune SmolLM2 at --ratio first (temporary dirs)

Writes benchmarks/results/chat_answers.json and .md (the command, machine and each model's pruning.json summary).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def _label(manifest: dict) -> str:
    cfg = manifest.get("config", {})
    alloc = cfg.get("width_allocation", "uniform")
    name = manifest.get("method", "?") + ("" if alloc == "uniform" else f" ({alloc} widths)")
    label = f"{name} {manifest.get('ratio_achieved', 0):.1%}"
    removed = manifest.get("removed_layers") or []
    if removed:
        label += f", {len(removed)} blocks removed"
    if cfg.get("search_speedup"):
        label += f", --target-speedup {cfg['search_speedup']:g}"
    source = (manifest.get("calibration") or {}).get("source", "c4")
    if source != "c4":
        label += f", calibrated on {source}"
    return label + "".join(f" + {_stage(s)}" for s in manifest.get("stages") or [])


def _stage(rec: dict) -> str:
    """A stage as it ran: its name, and for distillation its tokens and (where not the calibration's) its data."""
    name = rec.get("stage", "?")
    if name != "distill" or "tokens" not in rec:
        return name
    opts = rec.get("options") or {}
    data, weights = opts.get("data"), opts.get("train") == "weights"
    return f"{name} ({'weights, ' if weights else ''}{rec['tokens'] / 1000:.0f} k tokens{' of ' + data if data else ''})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--models", default="", help="comma-separated pruned model directories")
    ap.add_argument("--prune", default="", help="comma-separated methods or presets to prune first (temporary)")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--out", default=str(HERE / "results" / "chat_answers"))
    args = ap.parse_args(argv)
    import torch

    import comprune
    from comprune.config import PRESETS, PruneConfig
    from comprune.evaluate.chat import PROMPTS, chat_answers

    torch.manual_seed(0)
    model, tok = comprune.load(args.model)
    rows = [("dense", chat_answers(model, tok, PROMPTS, args.new_tokens))]
    summaries = {}
    with tempfile.TemporaryDirectory(prefix="comprune-chat-") as tmp:
        dirs = [Path(d) for d in args.models.split(",") if d]
        for name in filter(None, args.prune.split(",")):
            fresh, _ = comprune.load(args.model)
            cfg = PruneConfig(**{**PRESETS.get(name, {"method": name}), "ratio": args.ratio})
            _, report = comprune.prune(fresh, tok, cfg, progress=True)
            comprune.save_pretrained(fresh, tok, Path(tmp) / name, report)
            dirs.append(Path(tmp) / name)
        for d in dirs:
            manifest = json.loads((d / "pruning.json").read_text())
            pruned, ptok = comprune.from_pretrained(d)
            label = _label(manifest)
            if label in summaries:  # two models alike by their records: the directory tells them apart
                label += f" [{d.name}]"
            summaries[label] = {"dir": str(d), "params_after": manifest.get("params_after"),
                                "config": manifest.get("config")}
            rows.append((label, chat_answers(pruned, ptok, PROMPTS, args.new_tokens)))
    record = {"command": "python benchmarks/chat_answers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": args.model, "prompts": list(PROMPTS), "new_tokens": args.new_tokens,
              "answers": {label: ans for label, ans in rows}, "models": summaries,
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# Greedy chat answers ({args.model})", "", f"Command: `{record['command']}`  ",
             f"Greedy decoding through the chat template, {args.new_tokens} new tokens.", "",
             "| prompt | " + " | ".join(label for label, _ in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for k, prompt in enumerate(PROMPTS):
        cells = [ans[k].replace("\n", " ").replace("|", "\\|") for _, ans in rows]
        lines.append(f"| {prompt} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
