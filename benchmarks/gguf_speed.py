"""GGUF export speed/quality check: export each model dir to GGUF, run it in llama.cpp (xllamacpp).

Per model dir and GGUF type: file size, llama.cpp prompt-eval and generation tokens/s (fixed prompt,
128 new tokens, greedy, 2 threads, median of a few repeats after a warm-up), a greedy sample, and
perplexity on a short WikiText-2 slice next to transformers' (f32) on the very same token windows.

    .venv/bin/python benchmarks/gguf_speed.py                      # dense SmolLM2 (+ out/smollm2-comp-20)
    .venv/bin/python benchmarks/gguf_speed.py out/my-pruned --types q8_0 --repeats 5

Writes benchmarks/results/gguf_speed.json and .md (with the command that made them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import comprune  # noqa: E402
from comprune.data import load_text, tokenize_stream  # noqa: E402
from comprune.export.gguf import export_gguf  # noqa: E402
from comprune.export.llamacpp import complete, llamacpp_server, token_logprob  # noqa: E402
from comprune.loading import cache_dir  # noqa: E402

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. Within "
          "a few decades, print shops had spread across Europe, books became cheaper, and literacy grew. "
          "Historians often argue that this change shaped the Reformation, the scientific revolution and the "
          "modern state. In this essay, we look at")


def default_dirs() -> list[Path]:
    dense = cache_dir() / "SmolLM2-135M-Instruct"
    if not (dense / "config.json").is_file():
        comprune.load("smollm2")  # dequantises the embedded GGUF into the cache dir once
    dirs = [dense]
    if (ROOT / "out" / "smollm2-comp-20" / "config.json").is_file():
        dirs.append(ROOT / "out" / "smollm2-comp-20")
    return dirs


def measure_speed(server, prompt_ids: list[int], new_tokens: int, repeats: int) -> dict:
    """Median llama.cpp timings; the first call is a warm-up (weight repacking, page faults)."""
    request = {"prompt": prompt_ids, "n_predict": new_tokens, "temperature": 0, "ignore_eos": True,
               "cache_prompt": False}
    complete(server, dict(request, n_predict=8))
    runs = [complete(server, request) for _ in range(repeats)]
    timings = [r["timings"] for r in runs]
    return {"prompt_tokens": timings[0]["prompt_n"], "new_tokens": timings[0]["predicted_n"],
            "prompt_tok_s": round(statistics.median(t["prompt_per_second"] for t in timings), 1),
            "gen_tok_s": round(statistics.median(t["predicted_per_second"] for t in timings), 1),
            "gen_tok_s_all": [round(t["predicted_per_second"], 1) for t in timings]}


def greedy_sample(server, tokenizer, chars: int = 300) -> str:
    """A greedy answer to a plain question, to eyeball coherence (chat template when the tokenizer has one)."""
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    except Exception:  # no chat template: plain text prompt
        ids = tokenizer("The capital of France is", add_special_tokens=False).input_ids
    out = complete(server, {"prompt": ids, "n_predict": 64, "temperature": 0, "cache_prompt": False})
    return out["choices"][0]["text"][:chars]


def wikitext_windows(tokenizer, n_tokens: int, seqlen: int) -> torch.Tensor | None:
    try:
        ids = tokenize_stream(tokenizer, load_text("wikitext2"))
    except comprune.CompruneError as e:
        print(f"  perplexity skipped: {e}")
        return None
    n = min(n_tokens, ids.numel()) // seqlen
    return ids[: n * seqlen].view(n, seqlen)


def hf_perplexity(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(windows).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            windows[:, 1:].reshape(-1))
    return math.exp(nll.item())


def llamacpp_perplexity(server, windows: torch.Tensor, plain: int, n_vocab: int) -> float:
    """Each window scored alone, as transformers does: log p(w[i] | w[:i]) for i = 1..T-1."""
    total, count = 0.0, 0
    for window in windows.tolist():
        for i in range(1, len(window)):
            total -= token_logprob(server, window[:i], window[i], plain, n_vocab)
            count += 1
    return math.exp(total / count)


def hf_generation_speed(model, prompt_ids: list[int], new_tokens: int) -> float:
    """transformers (f32, greedy, same threads) tokens/s on the same prompt, for scale."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        start = time.time()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return round((out.shape[1] - ids.shape[1]) / (time.time() - start), 1)


def bench_dir(model_dir: Path, args, gguf_dir: Path) -> list[dict]:
    print(f"== {model_dir}")
    model, tokenizer = comprune.load(str(model_dir))
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False).input_ids
    plain = tokenizer(" the", add_special_tokens=False).input_ids[0]
    windows = wikitext_windows(tokenizer, args.ppl_tokens, args.seqlen) if args.ppl_tokens else None
    hf_ppl = round(hf_perplexity(model, windows), 3) if windows is not None else None
    hf_speed = hf_generation_speed(model, prompt_ids, args.new_tokens)
    rows = []
    for qtype in args.types:
        path = gguf_dir / f"{model_dir.name}-{qtype}.gguf"
        info = export_gguf(model_dir, path, qtype)
        print(f"  {qtype}: {info['bytes'] / 2**20:.1f} MiB, arch {info['arch']}, exported in {info['seconds']} s")
        server = llamacpp_server(path, n_ctx=1024, threads=args.threads)
        row = {"model_dir": str(model_dir), "qtype": qtype, "gguf": str(path), "arch": info["arch"],
               "n_layers": info["n_layers"], "ffn_widths": info["ffn_widths"], "mib": round(info["bytes"] / 2**20, 1),
               "export_s": info["seconds"], "hf_f32_gen_tok_s": hf_speed, "hf_f32_ppl": hf_ppl}
        row.update(measure_speed(server, prompt_ids, args.new_tokens, args.repeats))
        row["sample"] = greedy_sample(server, tokenizer)
        if windows is not None:
            start = time.time()
            row["llamacpp_ppl"] = round(llamacpp_perplexity(server, windows, plain, model.config.vocab_size), 3)
            row["ppl_rel_diff"] = round(row["llamacpp_ppl"] / hf_ppl - 1, 4)
            row["ppl_s"] = round(time.time() - start, 1)
        print(f"  {qtype}: prompt {row['prompt_tok_s']} tok/s, gen {row['gen_tok_s']} tok/s, "
              f"ppl {row.get('llamacpp_ppl')} vs transformers {hf_ppl}; sample {row['sample'][:80]!r}")
        del server
        rows.append(row)
    return rows


def write_markdown(path: Path, result: dict) -> None:
    s = result["settings"]
    lines = ["# GGUF export: llama.cpp speed and perplexity", "",
             f"Command: `{result['command']}`", "",
             f"Runtime: xllamacpp {result['runtime_version']} (llama.cpp), {s['threads']} threads, "
             f"{s['new_tokens']} new tokens greedy (EOS ignored), median of {s['repeats']} runs after a warm-up; "
             f"prompt {result['rows'][0]['prompt_tokens'] if result['rows'] else '?'} tokens. "
             f"Perplexity: first {s['ppl_tokens']} WikiText-2 test tokens in windows of {s['seqlen']}, the same "
             f"token ids fed to both runtimes (transformers in f32). Machine: {result['machine']}, 1-min load "
             f"average {result['load_avg_1min']['before']} before / {result['load_avg_1min']['after']} after "
             f"(llama.cpp's threads spin-wait, so other jobs on the 2 cores cut tokens/s a lot).", "",
             "| model | type | arch | layers | MiB | prompt tok/s | gen tok/s | transformers f32 gen tok/s "
             "| ppl llama.cpp | ppl transformers | rel diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {Path(r['model_dir']).name} | {r['qtype']} | {r['arch']} | {r['n_layers']} | {r['mib']} "
                     f"| {r['prompt_tok_s']} | {r['gen_tok_s']} | {r['hf_f32_gen_tok_s']} | {r.get('llamacpp_ppl')} "
                     f"| {r['hf_f32_ppl']} | {r.get('ppl_rel_diff')} |")
    lines += ["", "Greedy answers to \"What is the capital of France? Answer in one sentence.\":", ""]
    for r in result["rows"]:
        lines.append(f"- {Path(r['model_dir']).name} {r['qtype']}: {r['sample']!r}")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dirs", nargs="*", type=Path, help="HF model dirs (default: dense SmolLM2, "
                    "plus out/smollm2-comp-20 if present)")
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"], choices=["f32", "f16", "q8_0"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-tokens", type=int, default=512, help="WikiText-2 tokens for the perplexity check (0: skip)")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--gguf-dir", type=Path, default=ROOT / "out" / "gguf")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gguf_speed")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import xllamacpp

    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: load average {load_before:.1f} before the run: tokens/s will be low and noisy")
    rows = []
    for model_dir in args.model_dirs or default_dirs():
        rows += bench_dir(model_dir, args, args.gguf_dir)
    command = " ".join(["python benchmarks/gguf_speed.py", shlex.join(argv if argv is not None else sys.argv[1:])])
    result = {"command": command.strip(),
              "runtime_version": xllamacpp.__version__, "torch": torch.__version__,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_avg_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
              "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                              time.gmtime()),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                           if k not in ("model_dirs",)},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(args.out.with_suffix(".md"), result)
    print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
