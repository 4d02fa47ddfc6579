"""`make demo`: the main job on the embedded default model (SmolLM2-135M-Instruct)."""
from __future__ import annotations

import sys

from . import load, count_params
from .cli import _table
from .evaluate.perplexity import perplexity

DEMO_TOKENS = 32768  # the first 32,768 WikiText-2 test tokens: 256 windows @128, 16 windows @2048


def main() -> int:
    model, tok = load("smollm2")
    rows = []
    for seqlen in (128, 2048):
        r = perplexity(model, tok, "wikitext2", seqlen=seqlen, max_tokens=DEMO_TOKENS)
        rows.append({"model": "SmolLM2-135M (dense)", "params": count_params(model), **r})
    print(f"\nWikiText-2 test perplexity on the first {DEMO_TOKENS:,} tokens")
    print(_table(rows, ["model", "params", "seqlen", "windows", "ppl", "seconds", "tokens_per_second"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
