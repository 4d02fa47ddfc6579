"""COMP's neuron selection in one MLP: structured OBS (the default), the paper's condition score, or a one-shot
score of the dense columns (the ablation's other metrics)."""
from __future__ import annotations

import torch

from .. import scores as S
from ..obs import obs_select
from ..refit import dense_cross


def select_neurons(metric: str, G: torch.Tensor, parts, n_remove: int, cfg, C: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean keep mask over the MLP's neurons for one of COMP's metric variants (C: the refit's cross term)."""
    f = G.shape[0]
    if n_remove <= 0:
        return torch.ones(f, dtype=torch.bool, device=G.device)
    if metric == "obs":
        C = dense_cross(G, parts.down.weight.detach()) if C is None else C
        return obs_select(G, C, n_remove, cfg.damp, cfg.chunk)
    if metric == "condition":
        return obs_select(G, None, n_remove, cfg.damp, cfg.chunk, W=parts.down.weight)
    score = one_shot_scores(metric, G, parts, cfg)
    keep = torch.ones(f, dtype=torch.bool, device=G.device)
    keep[torch.topk(score, n_remove, largest=False).indices] = False
    return keep


def one_shot_scores(metric: str, G: torch.Tensor, parts, cfg) -> torch.Tensor:
    """Every neuron's score before any removal (higher = more important)."""
    W = parts.down.weight.detach()
    w_sq = (W.double() ** 2).sum(0).to(G.device)
    diag = torch.diagonal(G)
    if metric in ("condition", "obs"):
        return S.condition_scores(w_sq, torch.diagonal(S.spd_inverse(G, cfg.damp)).clamp_min(1e-300))
    if metric == "kappa-loo":
        return S.kappa_loo_scores(G, cfg.damp)
    if metric == "weighted-norm":
        return S.weighted_norm_scores(w_sq.sqrt(), diag)
    if metric == "activation":
        return S.activation_scores(diag)
    if metric == "wanda-sp":
        return S.wanda_sp_scores(W.to(G.device), diag)
    rows = [parts.up.weight, parts.down.weight.T] + ([parts.gate.weight] if parts.gate is not None else [])
    return S.magnitude_scores(*rows).to(G.device)  # magnitude
