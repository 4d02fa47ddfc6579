"""Dense SmolLM2-135M WikiText-2 perplexity on the full test set (seqlen 128 and 2048) and the evaluator's
throughput as achieved GFLOP/s beside this machine's measured float32 matmul rate.

    python benchmarks/ppl_dense.py [--max-tokens N]

Each seqlen's result is written to benchmarks/results/ppl_dense.json as it completes (a rerun skips it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "ppl_dense.json"


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def forward_flops_per_token(model, seqlen: int) -> float:
    """2 x (matmul weights incl. the head, embeddings' lookup excluded) + attention scores/values (causal avg)."""
    cfg = model.config
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    if cfg.tie_word_embeddings:
        weights += model.get_output_embeddings().weight.numel()
    heads_dim = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    attn = 2 * 2 * cfg.num_hidden_layers * heads_dim * (seqlen + 1) / 2
    return 2 * weights + attn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=None)
    args = ap.parse_args()
    import comprune
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results["command"] = "python benchmarks/ppl_dense.py" + (f" --max-tokens {args.max_tokens}" if args.max_tokens else "")
    model, tok = comprune.load("smollm2")
    for seqlen in (128, 2048):
        key = f"seqlen_{seqlen}"
        if key in results and results[key].get("max_tokens") == args.max_tokens:
            continue
        peak_before = matmul_gflops()
        r = comprune.perplexity(model, tok, "wikitext2", seqlen=seqlen, max_tokens=args.max_tokens)
        peak_after = matmul_gflops()
        fpt = forward_flops_per_token(model, seqlen)
        r.update(flops_per_token=fpt, achieved_gflops=r["tokens_per_second"] * fpt / 1e9,
                 matmul_peak_gflops=round(max(peak_before, peak_after), 1), loadavg_1min=os.getloadavg()[0],
                 threads=torch.get_num_threads(), params=comprune.count_params(model))
        results[key] = r
        tmp = OUT.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, OUT)
        print(json.dumps(r), flush=True)
    lines = ["# Dense SmolLM2-135M-Instruct, WikiText-2 test perplexity", "", f"Command: `{results['command']}`", "",
             "| seqlen | windows | tokens | PPL | seconds | tokens/s | achieved GFLOP/s | float32 matmul GFLOP/s | load avg |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for seqlen in (128, 2048):
        r = results.get(f"seqlen_{seqlen}")
        if r:
            lines.append(f"| {seqlen} | {r['windows']} | {r['tokens']:,} | {r['ppl']:.3f} | {r['seconds']:.0f} | "
                         f"{r['tokens_per_second']:.0f} | {r['achieved_gflops']:.1f} | {r['matmul_peak_gflops']} | "
                         f"{r['loadavg_1min']:.1f} |")
    (HERE / "results" / "ppl_dense.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
