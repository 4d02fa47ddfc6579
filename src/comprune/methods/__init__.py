"""Pruning methods, one module each, registered with comprune.registry at the bottom of that module.

A method supplies what the block walk (comprune.sequential.walk_blocks) runs: an optional plan (its dense
analysis, computed once before any block changes and checkpointed), a step per block (the block's record and the
next block's inputs), and its report's details. The walk owns the loop, residency, checkpoints and resume; prune()
drops the removed blocks and rewrites the config afterwards."""
from . import comp, layer_drop, wanda_sp, magnitude, flap, llm_pruner  # noqa: F401  (the built-ins, `--help` order)
