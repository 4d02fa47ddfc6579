"""Pruning methods: each composes scores, allocation and recovery inside the same block walk.

A method is `run(model, adapter, acts, input_ids, cfg, budget, show) -> dict` with at least
`removed_layers` (original indices) and `blocks` ({original layer index: {"width", "kept_neurons", ...}}).
It slices MLPs as it walks; prune() drops the removed blocks and rewrites the config afterwards.
Optional attributes of a run function: `needs_gradients = True` (prune() skips the forward capture and enables
autograd) and `plan_budget(model, adapter, cfg) -> Budget` (its own split of the parameter budget).
"""
from . import baselines, comp

METHODS = {"comp": comp.run, **baselines.BASELINES}


def register(name, fn):
    METHODS[name] = fn
