"""Pruning methods, each registered with comprune.registry at the bottom of its module.

A method's run function is `run(walk, acts) -> dict` (walk: comprune.sequential.Walk; acts: block 0's inputs, or
None for a method that needs gradients) returning at least `removed_layers` (original indices) and `blocks`
({original layer index: {"width", "kept_neurons", ...}}); it walks the blocks with comprune.sequential.walk_blocks,
supplying its plan and per-block step. prune() drops the removed blocks and rewrites the config afterwards. Its
record (comprune.registry.Method) declares its options and capabilities."""
from . import comp, layer_drop, wanda_sp, flap, llm_pruner  # noqa: F401  (the built-ins, in `--help` order)
from ..registry import methods


def __getattr__(name):
    if name == "METHODS":  # {name: run function}, as older callers read it
        return {n: m.run for n, m in methods().items()}
    raise AttributeError(name)
