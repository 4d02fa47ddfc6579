"""The budget: what a prune removes, from a ratio of parameters, a GGUF file size or a llama.cpp speedup.

`plan` splits a ratio into whole blocks, attention heads, experts and MLP neurons; `speed` plans against a
latency table; both are pure functions of the model's shapes and a configuration they only read. `targets`
turns a size or speed target into the ratio and configuration to prune with, and records what the pruned model
reached; it measures exports, so it sits above comprune.export and is imported on its own
(`from comprune.budget.targets import resolve, finish`, or comprune.resolve_budget / finish_budget)."""
from .plan import (Budget, block_params, budget_base, kept_width, params_per_neuron, plan_budget, plan_layers_only,
                   plan_neurons_only)
from .speed import blocks_for_speedup, plan_speedup, predicted_speedup, ratio_for_speedup, settled, speedup_blocks

__all__ = ["Budget", "block_params", "budget_base", "kept_width", "params_per_neuron", "plan_budget",
           "plan_layers_only", "plan_neurons_only", "blocks_for_speedup", "plan_speedup", "predicted_speedup",
           "ratio_for_speedup", "settled", "speedup_blocks"]
