"""benchmarks/results/official/summary.md from the JSON rows there: each official run beside its harness
counterpart (same model, slice and evaluator), with the command that made each row.

    python benchmarks/official/summary.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PAIRS = [("llm-pruner", ("harness-llm-pruner", "harness-llm-pruner-folded")), ("flap", ("harness-flap", "harness-flap-official-windows")),
         ("wanda-sp", ("harness-wanda-sp", "harness-wanda-sp-official-windows")), ("shortgpt", ("harness-layer-drop",))]


def row(r: dict, ref: dict | None) -> str:
    def ppl(key):
        v = r.get(key)
        if v is None:
            return "–"
        if ref is None or ref.get(key) is None:
            return f"{v:.2f}"
        return f"{v:.2f} ({100 * (v / ref[key] - 1):+.1f} %)"
    src = r.get("source", {})
    what = f"official `{src.get('repo')}`@{(src.get('commit') or '?')[:7]}" if r["kind"] == "official" else "harness"
    p = r.get("prune", {})
    return (f"| {r['method']} | {what} | {r['params_after'] / 1e6:.2f} M (−{r['params_removed_pct']:.2f} %) | "
            f"{ppl('ppl_128')} | {ppl('ppl_2048')} | {p.get('seconds', 0):.0f} s | {p.get('peak_rss_mb', 0) / 1024:.2f} GB |"
            f" `{r['command']}` |")


def main():
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(C.RESULTS.glob("*.json"))}
    lines = ["# Official baselines beside the harness's", "",
             f"SmolLM2-135M-Instruct, float32, CPU; perplexity by comprune's evaluator on the first "
             f"{C.SLICE['max_tokens']:,} WikiText-2 test tokens (windows of 128 and 2048). Harness rows in brackets: "
             "change against the official row above them. Prune time and peak RSS are of the pruning process alone "
             "(shared 2-core machine, nice 19, one BLAS thread unless the JSON says otherwise). Each row's JSON in "
             "this directory has the full recipe, versions and machine.", "",
             "| method | code | params | PPL@128 | PPL@2048 | prune time | peak RSS | command |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for official, harness in PAIRS:
        ref = rows.get(official)
        if ref:
            lines.append(row(ref, None))
        lines += [row(rows[h], ref) for h in harness if h in rows]
    rest = [k for k in rows if k not in {official for official, _ in PAIRS} | {h for _, hs in PAIRS for h in hs}]
    for k in rest:
        lines.append(row(rows[k], None))
    notes = sorted({n for r in rows.values() for n in r.get("notes", [])})
    if notes:
        lines += ["", "Shims and patches of the official runs:", ""] + [f"- {n}" for n in notes]
    out = C.RESULTS / "summary.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
