"""Every import comprune defers on purpose, in one place. All other imports sit at the top of their module.

There are two reasons, and only these two:

1. **A streamed prune's memory floor.** `comprune prune --stream` of a Llama-family model runs on comprune's
   plain-PyTorch modules (models/lite.py) and must never import transformers' modeling code (~130 MB resident
   for its imports alone: torch.distributed.tensor, generation utilities, ...), accelerate's big-model
   helpers, or a tokenizer in the parent process (the calibration child tokenises and saves it).
   tests/test_lite.py asserts that `import comprune` leaves `transformers.modeling_utils` out.
2. **Optional extras** that a default install does not have: lm-evaluation-harness (`[eval]`), matplotlib
   (`[plot]`), xllamacpp (`[llamacpp]`) and `datasets` (only used online, without a local data copy). Each
   caller turns the ImportError into a one-line CompruneError naming the extra.

Each function imports on its first call and returns the module or object. One deferral lives elsewhere, because
its file must stay self-contained (it is copied next to pruned models for `trust_remote_code`):
models/modeling_comprune.py builds its model classes, and so imports transformers' modeling code, on first use.
"""
from __future__ import annotations

import importlib

# ---------------------------------------------------------------------------------- 1. memory floor


def transformers_modeling(family: str):
    """transformers' modeling module of a family (e.g. transformers.models.llama.modeling_llama)."""
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def auto_tokenizer():
    """transformers' AutoTokenizer (its tokenization stack is only needed where a tokenizer is loaded)."""
    from transformers import AutoTokenizer
    return AutoTokenizer


def init_empty_weights():
    """accelerate's init_empty_weights: a transformers model skeleton on the meta device."""
    from accelerate import init_empty_weights as empty
    return empty


def get_max_memory():
    """accelerate's get_max_memory (free memory per GPU)."""
    from accelerate.utils import get_max_memory as max_memory
    return max_memory


# ---------------------------------------------------------------------------------- 2. optional extras


def lm_eval(*submodules: str):
    """lm-evaluation-harness (`pip install 'comprune[eval]'`), with `submodules` (e.g. "evaluator") loaded."""
    module = importlib.import_module("lm_eval")
    for name in submodules:
        importlib.import_module(f"lm_eval.{name}")
    return module


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (`pip install 'comprune[plot]'`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def xllamacpp():
    """llama.cpp's Python bindings (`pip install 'comprune[llamacpp]'`)."""
    import xllamacpp as module
    return module


def datasets():
    """Hugging Face `datasets`, for data read from the hub when there is no local copy."""
    import datasets as module
    return module
