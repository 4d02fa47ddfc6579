"""COMP's MLP stage on a mixture-of-experts layer: whole experts first, then neurons inside the rest (STUN's order).

1. experts: an expert's score is its share of the layer's output on the calibration tokens routed to it,
   Σ_t w_te ‖E_e(x_t)‖ (routed usage × output contribution). The lowest go with their router rows; tokens that
   chose them route to their next choices, exactly as a router with those logits at −∞ would.
2. neurons: on the new routing, every kept expert loses the same number of neurons (the family's 3-D layout has
   one width per layer) by structured OBS on the Gram of its routed, routing-weighted activations w·a, and its
   down_proj is refitted by damped least squares to its own dense output there, the dense MLP's machinery per
   expert (refit.py): the layer's output is Σ_e w_e down_e(a_e) = Σ_e down_e(w_e a_e).
"""
from __future__ import annotations

import torch

from ..errors import CompruneError
from ..obs import obs_select
from ..refit import dense_cross, refit, residual
from ..surgery import prune_expert_neurons, prune_experts
from ..walk import forward_block
from .common import keep_lowest_removed


def check_moe_config(cfg):
    """What COMP's MoE stage does not do yet, refused before any work."""
    for bad, flag in ((cfg.width_allocation != "uniform", f"--width-allocation {cfg.width_allocation}"),
                      (cfg.target_mix > 0, "--target-mix"), (cfg.layer_compensation, "--layer-compensation")):
        if bad:
            raise CompruneError(f"{flag} is not implemented for mixture-of-experts models yet: drop it (every "
                                "block then loses the same experts and neurons, refitted to its dense output)")


class _ExpertStats:
    def __init__(self, n_experts: int, gram: bool):
        self.score = torch.zeros(n_experts, dtype=torch.float64)
        self.tokens = torch.zeros(n_experts, dtype=torch.long)
        self.G: list[torch.Tensor | None] = [None] * n_experts
        self.gram = gram

    def __call__(self, e, x, a, w, y):
        self.score[e] += float((w.squeeze(-1).double() * y.double().norm(dim=-1)).sum())
        self.tokens[e] += x.shape[0]
        if self.gram:
            wa = (a * w).float()
            g = wa.T @ wa
            self.G[e] = g.double() if self.G[e] is None else self.G[e].add_(g)


def expert_scores(layer, adapter, acts) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert: Σ_t w_te ‖E_e(x_t)‖ over the calibration tokens routed to it, and how many tokens were."""
    lst = adapter.experts(layer)
    with lst.observing(_ExpertStats(lst.num_experts, gram=False)) as st:
        forward_block(layer, acts, keep=False)
    return st.score, st.tokens


def prune_block_moe(layer, adapter, acts, n_experts: int, n_neurons: int, cfg):
    """Remove `n_experts` experts, then `n_neurons` neurons from each kept expert, of one block on its
    (already-pruned-upstream) inputs; returns the record and the block's new outputs."""
    rec = {}
    if n_experts > 0:
        score, tokens = expert_scores(layer, adapter, acts)
        order = torch.argsort(score, stable=True)
        keep = torch.sort(order[n_experts:]).values
        prune_experts(adapter, layer, keep)
        rec.update(kept_experts=keep.tolist(), expert_scores=[float(s) for s in score],
                   expert_tokens=[int(t) for t in tokens])
    lst = adapter.experts(layer)
    rec["width"] = lst.width
    if n_neurons > 0:
        with lst.observing(_ExpertStats(lst.num_experts, gram=True)) as st:
            forward_block(layer, acts, keep=False)
        kept, downs, errors = [], [], []
        for e, ex in enumerate(lst.experts):
            W = ex.down_proj.weight.detach()
            G = st.G[e]
            if G is None:  # no calibration token chose it: nothing to fit; keep its strongest columns
                kept.append(keep_lowest_removed(W.double().norm(dim=0), n_neurons).nonzero().flatten())
                downs.append(None)
                errors.append(None)
                continue
            C = dense_cross(G, W)
            keep = obs_select(G, C, n_neurons, cfg.damp, cfg.chunk)
            idx = keep.nonzero().flatten()
            new = refit(G, C, idx, cfg.damp) if cfg.recovery == "least-squares" and cfg.mask_tuning else None
            t_energy = float((C.T * W.double()).sum())  # tr(W G Wᵀ): ‖dense expert output‖² over its tokens
            before = residual(G, C, t_energy, idx, W.double()[:, idx])
            after = residual(G, C, t_energy, idx, new) if new is not None else before
            errors.append((before / max(t_energy, 1e-30), after / max(t_energy, 1e-30)))
            kept.append(idx)
            downs.append(new)
        prune_expert_neurons(adapter, layer, kept, downs)
        rec["width"] = adapter.experts(layer).width
        rec["kept_neurons"] = [k.tolist() for k in kept]
        fitted = [x for x in errors if x is not None]
        if fitted:
            rec["rel_error_pruned"] = sum(b for b, _ in fitted) / len(fitted)
            rec["rel_error_tuned"] = sum(a for _, a in fitted) / len(fitted)
    return rec, forward_block(layer, acts)


def replay_moe(adapter, layer, rec: dict, saved: dict):
    """Re-apply one block's recorded expert surgery (resume): its kept experts and neurons, and the saved
    refitted down_proj of every kept expert."""
    if "kept_experts" in rec:
        prune_experts(adapter, layer, torch.tensor(rec["kept_experts"], dtype=torch.long))
    if "kept_neurons" in rec:
        kept = [torch.tensor(k, dtype=torch.long) for k in rec["kept_neurons"]]
        prune_expert_neurons(adapter, layer, kept, [saved.get(f"down.{e}") for e in range(len(kept))])
