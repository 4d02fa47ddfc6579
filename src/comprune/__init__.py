"""comprune: post-training structured pruning (COMP) for on-device LLMs.

Public API: load, prune, PruneConfig, perplexity, save_pretrained, from_pretrained; resolve_budget and
finish_budget for a GGUF size or llama.cpp speed target instead of a ratio.
"""
import os

# MKL's own cache of freed buffers keeps each block's largest workspace (a few f x f float64 matrices) resident
# between blocks and on top of the next one's: off, a streamed SmolLM2 prune peaks ~15 MB lower (below its
# weights), ~3 % slower, same bytes. Read once when MKL starts, so before torch is imported; a user's own
# setting wins.
os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")

from . import models  # noqa: F401,E402  (registers comprune's per-layer-width classes with transformers' Auto*)
from .budget.targets import finish as finish_budget, resolve as resolve_budget
from .config import PruneConfig
from .data import Calibration, get_calibration
from .errors import CompruneError
from .evaluate.perplexity import perplexity
from .io import read_manifest, save_pretrained
from .loading import count_params, load
from .prune import PruneReport, prune
from .stream import prune_streaming
from .version import __version__


def from_pretrained(path, dtype="float32", device="cpu", trust_remote_code=False, allow_pickle=False):
    """Load a (pruned) model directory: same as load(path)."""
    return load(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

__all__ = ["CompruneError", "load", "from_pretrained", "count_params", "perplexity", "PruneConfig", "PruneReport",
           "prune", "save_pretrained", "read_manifest", "prune_streaming", "Calibration", "get_calibration", "__version__",
           "resolve_budget", "finish_budget"]
