"""`make demo`: prune the embedded default (SmolLM2-135M-Instruct) by 20 % with COMP, save it under out/,
and compare dense vs pruned WikiText-2 perplexity on a fixed slice."""
from __future__ import annotations

import sys
import time

from .cli.format import table
from .config import PruneConfig
from .evaluate.chat import PROMPTS, chat_answers
from .evaluate.perplexity import perplexity
from .io import save_pretrained
from .loading import count_params, load
from .prune import prune

DEMO_TOKENS = 32768  # the first 32,768 WikiText-2 test tokens: 256 windows @128, 16 windows @2048
OUT = "out/smollm2-comp-20"


def ppl_row(name, model, tok, extra):
    row = {"model": name, "params": count_params(model), "layers": model.config.num_hidden_layers, **extra}
    for seqlen in (128, 2048):
        row[f"ppl@{seqlen}"] = perplexity(model, tok, "wikitext2", seqlen=seqlen, max_tokens=DEMO_TOKENS)["ppl"]
    return row


def main() -> int:
    model, tok = load("smollm2")
    rows = [ppl_row("SmolLM2-135M dense", model, tok, {"prune s": "-", "peak RSS MB": "-"})]
    prompts = PROMPTS[:2]
    dense_answers = chat_answers(model, tok, prompts)
    t0 = time.perf_counter()
    model, report = prune(model, tok, PruneConfig(ratio=0.2, method="comp"), base_model="smollm2")
    print(f"pruned in {time.perf_counter() - t0:.0f} s; saving to {OUT}")
    save_pretrained(model, tok, OUT, report, force=True)
    rows.append(ppl_row("COMP 20 %", model, tok, {"prune s": round(report.seconds, 1),
                                                   "peak RSS MB": round(report.peak_rss_mb)}))
    print(f"\nWikiText-2 test perplexity, first {DEMO_TOKENS:,} tokens (calibration: {report.config['nsamples']}"
          f" x {report.config['seqlen']} C4 tokens)")
    print(table(rows, ["model", "params", "layers", "ppl@128", "ppl@2048", "prune s", "peak RSS MB"]))
    print(f"removed layers {report.removed_layers}, MLP width {report.mlp_widths[0]} of 1536, "
          f"achieved ratio {report.ratio_achieved:.4f}; model saved in {OUT}")
    print("\nGreedy chat answers (dense | COMP 20 %):")
    for prompt, a, b in zip(prompts, dense_answers, chat_answers(model, tok, prompts)):
        print(f"  Q: {prompt}\n    dense: {a!r}\n    COMP:  {b!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
