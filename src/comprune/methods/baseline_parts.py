"""Pieces the baselines share: the record of a block, the uniform neuron count, and per-expert moments on the
tokens routed to each expert (mixture-of-experts blocks)."""
from __future__ import annotations

import torch

from ..surgery import as_index, prune_expert_neurons
from ..walk import InputStats
from ..budget.plan import kept_width
from .common import full_record, keep_lowest_removed


def record(adapter, layer, **extra) -> dict:
    rec = full_record(adapter, layer)
    rec.update(extra)
    return rec


def uniform_n_remove(adapter, layer, budget, cfg) -> int:
    width = adapter.mlp(layer).down.in_features
    return width - kept_width(width, budget.neurons_per_layer, cfg.round_to, max(cfg.min_width, 1))


def prune_experts_by(adapter, layer, n_remove: int, score_of) -> dict:
    """Every expert of a mixture-of-experts block loses its n_remove lowest-scoring neurons (score_of(e, expert))."""
    lst = adapter.experts(layer)
    kept = [as_index(keep_lowest_removed(score_of(e, ex), n_remove)) for e, ex in enumerate(lst.experts)]
    prune_expert_neurons(adapter, layer, kept, [None] * len(kept))
    return {"width": lst.width, "kept_neurons": [k.tolist() for k in kept]}


class RoutedMoments:
    """Per expert, the moments of its down_proj inputs over the tokens routed to it (Wanda's ‖X_j‖², FLAP's
    variance); an expert no token chose has zeros."""

    def __init__(self, n: int, width: int):
        self.stats = [InputStats(n=width) for _ in range(n)]

    def __call__(self, e, x, a, w, y):
        self.stats[e].add(a)

    def sqnorm(self, e: int) -> torch.Tensor:
        s = self.stats[e]
        return s.sqnorm() if s.count else torch.zeros(s.n, dtype=torch.float64)

    def var(self, e: int) -> torch.Tensor:
        s = self.stats[e]
        return s.var() if s.count else torch.zeros(s.n, dtype=torch.float64)
