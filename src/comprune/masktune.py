"""Stage 3 of COMP: per-neuron scales that make the pruned MLP reproduce the dense one, folded into down_proj.

minimise  sum_tokens || sum_{j in all} h_j w_j - sum_{j in S} m_j h_j w_j ||^2
Normal equations in |S| unknowns only: A = G_SS o (W_S^T W_S), b_j = sum_k G_jk (w_j . w_k),
solved with a ridge toward m = 1 (rho * mean(diag A)). Everything comes from the Gram matrix G = H^T H,
so no activations are stored.
"""
from __future__ import annotations

import torch


def output_gram(G: torch.Tensor, W_down: torch.Tensor) -> torch.Tensor:
    """K_jk = G_jk (w_j . w_k): the Gram of the neurons' output contributions h_j w_j over tokens."""
    Wd = W_down.double().to(G.device)
    return (Wd.T @ Wd).mul_(G)  # in place: one f x f temporary fewer


def solve_scales(K: torch.Tensor, keep: torch.Tensor, ridge: float = 0.01) -> torch.Tensor:
    A = K[keep][:, keep]
    b = K[keep].sum(1)
    mu = torch.diagonal(A).mean().clamp_min(1e-30)
    torch.diagonal(A).add_(ridge * mu)  # A is a fresh copy (advanced indexing): no identity temporary
    return torch.linalg.solve(A, b + ridge * mu)


def error_from_gram(K: torch.Tensor, keep: torch.Tensor, scales: torch.Tensor | None = None) -> float:
    """sum over tokens of ||dense MLP output - pruned (scaled) MLP output||^2."""
    m = torch.zeros(K.shape[0], dtype=K.dtype, device=K.device)
    m[keep] = 1.0 if scales is None else scales.double()
    r = 1.0 - m  # residual coefficient of every neuron
    return float(r @ K @ r)


def tune_scales(G: torch.Tensor, W_down: torch.Tensor, keep: torch.Tensor, ridge: float = 0.01) -> torch.Tensor:
    """Scales m [|S|] for the kept neurons (`keep` = boolean mask or index tensor)."""
    return solve_scales(output_gram(G, W_down), keep, ridge)


def reconstruction_error(G: torch.Tensor, W_down: torch.Tensor, keep: torch.Tensor,
                         scales: torch.Tensor | None = None) -> float:
    return error_from_gram(output_gram(G, W_down), keep, scales)
