"""Offline data shims shared by the official-code runners (run inside each official virtualenv).

Only the data sources change: hub datasets become the local C4 sample (/work/shared/data/c4) read with the same
sampling loops the official loaders use, and the pruned model is written as safetensors + a JSON of its shapes
(read back by benchmarks/official/_common.py in comprune's environment). Nothing here touches an algorithm.
"""
from __future__ import annotations

import gzip
import json
import os
import sys
import types
from pathlib import Path

PROBE = [1, 504, 3458, 314, 253, 1345, 28, 3011, 4075, 30, 216, 1033]  # fixed token ids for the load check
C4 = Path(os.environ.get("COMPRUNE_C4", "/work/shared/data/c4/c4-sample.00000-of-00001.json.gz"))


def c4_texts() -> list[str]:
    with gzip.open(C4, "rt") as f:
        return [json.loads(line)["text"] for line in f]


class LocalRows:
    """Enough of a datasets.Dataset for the official loaders: len() and rows[i]['text']."""

    def __init__(self, texts):
        self.texts = texts

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return {"text": self.texts[i]}
        return {"text": self.texts[i]}


def stub_datasets():
    """The official modules import `datasets` at import time; every call into it is replaced below, so a stub
    that refuses to load anything keeps the run offline (and proves it). transformers is imported first, so its
    own availability check finds no `datasets` package."""
    import transformers  # noqa: F401
    mod = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise RuntimeError(f"offline run: load_dataset{args} was not shimmed")

    mod.load_dataset = load_dataset
    sys.modules.setdefault("datasets", mod)


def save_pruned(model, out_dir: str | os.PathLike, removed_layers=(), extra: dict | None = None):
    """model.state_dict() as safetensors (tied lm_head left out) + shapes.json describing the pruned model."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    sd = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()
          if not (tied and k == "lm_head.weight") and "rotary_emb" not in k}
    save_file(sd, str(out / "pruned.safetensors"))
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # a probe the loader in comprune's environment must reproduce
        probe = model(torch.tensor([PROBE]), use_cache=False).logits[0, -1, :8].double().tolist()
    meta = {"params": int(params), "removed_layers": sorted(int(i) for i in removed_layers), "probe_logits": probe,
            "shapes": {k: list(v.shape) for k, v in sd.items()}, **(extra or {})}
    (out / "shapes.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"[shim] saved pruned model ({params:,} params) to {out}", flush=True)
