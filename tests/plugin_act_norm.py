"""A pruning method written as a third-party plug-in would be: this module and its one `register(...)` call, no
other file. MLP neurons by the norm of their activations (down_proj inputs) to a power, as many from every
block, each block fed by the pruned blocks before it. tests/test_plugins.py runs it through every entry point."""
from __future__ import annotations

from dataclasses import dataclass, field

from comprune.budget import plan_neurons_only
from comprune.errors import CompruneError
from comprune.methods.common import full_record, keep_lowest_removed
from comprune.registry import Method, register
from comprune.surgery import as_index, prune_mlp
from comprune.walk import collect_stats, forward_block


@dataclass(frozen=True)
class ActNormOptions:
    power: float = field(default=1.0, metadata={"help": "act-norm: a neuron's score is its activation norm to "
                                                        "this power"})

    def validate(self, cfg) -> None:
        if not self.power > 0:
            raise CompruneError(f"--power must be > 0 (got {self.power})")


def step(walk, i, layer, acts, plan, carry):
    parts = walk.adapter.mlp(layer)
    stats, _ = collect_stats(layer, acts, {"down": parts.down}, keep_outputs=False)
    score = stats["down"].sqnorm() ** (walk.cfg.power / 2)
    idx = as_index(keep_lowest_removed(score, walk.budget.neurons_per_layer))
    prune_mlp(walk.adapter, layer, idx)
    return {**full_record(walk.adapter, layer), "kept_neurons": idx.tolist()}, forward_block(layer, acts, consume=True)


register(Method("act-norm", step, ActNormOptions, plan_budget=plan_neurons_only,
                help="test plug-in: neurons by activation norm"))
