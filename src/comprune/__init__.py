"""comprune: post-training structured pruning (COMP) for on-device LLMs.

Public API: load, prune, PruneConfig, perplexity, save_pretrained, from_pretrained.
"""
from .errors import CompruneError
from .loading import count_params, load
from . import models  # noqa: F401  (registers comprune's per-layer-width classes with transformers' Auto*)
from .evaluate.perplexity import perplexity

__version__ = "0.1.0"
__all__ = ["CompruneError", "load", "count_params", "perplexity", "__version__"]
