"""Recovery stages after a prune: end-to-end mask tuning (scales only, folded into the weights) and knowledge
distillation through merged LoRA adapters. Each takes the pruned model, the dense model's targets (or the dense
model itself) and windows, so it applies to a model pruned earlier too."""
from .distill import DistillOptions, distill
from .stage import Recovery, heldout_ids, prepare, run
from .targets import DenseTargets
from .tune import TuneOptions, tune

__all__ = ["DenseTargets", "DistillOptions", "Recovery", "TuneOptions", "distill", "heldout_ids", "prepare", "run",
           "tune"]
