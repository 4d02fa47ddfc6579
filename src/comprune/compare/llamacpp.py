"""A comparison's llama.cpp column: every pruned model exported to GGUF (f16) and timed in llama.cpp beside the
dense model's export, prompt processing and generation, alternating run by run (export.llamacpp).

Where users run small pruned models: transformers' eager `generate` at batch 1 is dominated by per-operation
overhead, so its tokens/s barely follows the parameters removed. A run whose export is not possible (no
xllamacpp, a family the exporter does not write, a dense model that is not a local directory) records why
instead, and the column shows "-" with a note.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import deferred
from ..errors import CompruneError
from ..export.gguf import export_gguf
from ..export.llamacpp import relative_llamacpp_speed
from ..stream import resolve_stream_source

QTYPE = "f16"
PROMPT_TOKENS = 128  # the first WikiText-2 test tokens: the same prompt for every model


def _dense_gguf(cmp) -> Path:
    path = cmp.out / "gguf" / f"dense-{QTYPE}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_gguf(resolve_stream_source(cmp.model_spec), path, QTYPE, force=True)
    return path


def llamacpp_speed(cmp, name: str, model_dir: Path, tokenizer) -> dict:
    """`cmp`: the Comparison. llama.cpp tokens/s of run `name` (its model in `model_dir`) relative to dense,
    or {"skipped": why}."""
    try:
        deferred.xllamacpp()
    except ImportError:
        return {"skipped": "xllamacpp is not installed (pip install xllamacpp)"}
    path = cmp.out / "gguf" / f"{name}-{QTYPE}.gguf"
    try:
        dense = _dense_gguf(cmp)
        info = export_gguf(model_dir, path, QTYPE, force=True)
        prompt = cmp.wikitext_ids(tokenizer)[:PROMPT_TOKENS].tolist()
        rec = relative_llamacpp_speed(path, dense, prompt, new_tokens=cmp.speed_tokens, repeats=cmp.speed_repeats,
                                      threads=torch.get_num_threads())
    except CompruneError as e:
        return {"skipped": f"no GGUF/llama.cpp measurement: {e}"}
    finally:
        path.unlink(missing_ok=True)
    return {**rec, "qtype": QTYPE, "arch": info["arch"],
            "prompt": f"first {PROMPT_TOKENS} WikiText-2 test tokens"}
