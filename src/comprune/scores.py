"""Importance scores: pure functions of weights and calibration statistics.

Conventions: a neuron j of an MLP owns row j of gate/up and column j of down (`w_j`). Higher score = more
important. G is the Gram matrix H^T H of the MLP's intermediate activations over calibration tokens.
"""
from __future__ import annotations


import torch

from .errors import CompruneError


def damped(G: torch.Tensor, damp: float) -> torch.Tensor:
    """G + damp * mean(diag G) * I: keeps the inverse defined for dead or collinear neurons."""
    mu = torch.diagonal(G).double().mean().clamp_min(1e-12)
    out = G.to(torch.float64, copy=True)
    torch.diagonal(out).add_(damp * mu)  # the diagonal alone: no f x f identity temporary
    return out


def spd_inverse(G: torch.Tensor, damp: float | None = None) -> torch.Tensor:
    """Inverse of the symmetric positive definite G (damped first when `damp` is given). At most four f x f
    matrices are alive at once, G included: the damped copy is freed before the inverse is computed."""
    D = damped(G, damp) if damp is not None else G
    try:
        L = torch.linalg.cholesky(D)
    except RuntimeError:
        raise CompruneError("the calibration Gram matrix is not positive definite even after damping: "
                            "raise --damp or use more calibration samples") from None
    del D
    # cholesky_solve against I, not cholesky_inverse: MKL's potri ran ~30x slower here (23 s against 0.7 s for
    # f = 1536 in float64 on an AVX2 EPYC), for the same result to rounding.
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    return torch.cholesky_solve(eye, L)


def condition_scores(w_sqnorm: torch.Tensor, ginv_diag: torch.Tensor) -> torch.Tensor:
    """s_j = ||w_j||^2 / [G^-1]_jj: the output energy of neuron j that no other neuron can reproduce
    (1/[G^-1]_jj = G_jj (1 - R_j^2)); equivalently the error of removing j after the best re-weighting of the rest."""
    return w_sqnorm.double() / ginv_diag


def downdate_inverse(Ginv: torch.Tensor, remove: torch.Tensor) -> torch.Tensor:
    """Inverse of G restricted to the other indices, from the inverse of G (block Schur complement).
    Updates `Ginv` in place (an f x f float64 matrix is 18 MB for SmolLM2, more for larger MLPs) and returns it.

    For a single index this is the rank-one downdate Ginv - Ginv[:,j] Ginv[j,:] / Ginv[j,j]. The result keeps
    the full shape with zero rows/columns at `remove`, so indices never shift."""
    C = Ginv[:, remove]  # a copy (advanced indexing), so updating Ginv in place below is safe
    out = Ginv.addmm_(C, torch.linalg.solve(Ginv[remove][:, remove], C.T), alpha=-1)
    out[remove, :] = 0
    out[:, remove] = 0
    return out


def kappa_loo_scores(G: torch.Tensor, damp: float = 0.01, iters: int = 64) -> torch.Tensor:
    """Literal leave-one-out condition number: score_j = -kappa(G without row/column j). Removing the neuron
    whose absence leaves the best-conditioned set goes first.

    Exact, in O(f^3 + iters f^2) instead of f eigendecompositions: with G = V diag(lam) V^T, the eigenvalues of
    the principal submatrix G_-j are the roots of the secular function sum_i V_ji^2 / (mu - lam_i), which is
    decreasing between consecutive poles, and by Cauchy interlacing its extreme roots lie in [lam_2, lam_1]
    and [lam_f, lam_f-1]. Bisection on both brackets for every j at once (iters halvings reach float64
    resolution)."""
    Gd = damped(G, damp)
    lam, V = torch.linalg.eigh(Gd)  # ascending
    W = V ** 2  # W[j, i]: weight of pole lam_i in the secular function of G_-j
    f = lam.numel()
    if f < 3:
        return -(lam[-1] / lam[0]).expand(f).clone()

    def root(lo: float, hi: float) -> torch.Tensor:
        a = torch.full((f,), lo, dtype=lam.dtype, device=lam.device)
        b = torch.full((f,), hi, dtype=lam.dtype, device=lam.device)
        for _ in range(iters):
            mid = (a + b) / 2
            d = mid[:, None] - lam[None, :]
            d = torch.where(d == 0, torch.full_like(d, 1e-300), d)
            above = (W / d).sum(1) > 0  # secular function positive: the root is to the right of mid
            a, b = torch.where(above, mid, a), torch.where(above, b, mid)
        return (a + b) / 2

    mu_max = root(lam[-2].item(), lam[-1].item())
    mu_min = root(lam[0].item(), lam[1].item())
    return -(mu_max / mu_min)


def kappa_loo_scores_direct(G: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """kappa_loo_scores by f eigendecompositions (O(f^4)): the reference the tests check against."""
    Gd = damped(G, damp)
    f = Gd.shape[0]
    out = torch.empty(f, dtype=torch.float64)
    idx = torch.arange(f)
    for j in range(f):
        ev = torch.linalg.eigvalsh(Gd[idx != j][:, idx != j])
        out[j] = -(ev[-1] / ev[0])
    return out


def weighted_norm_scores(w_norm: torch.Tensor, act_sqsum: torch.Tensor) -> torch.Tensor:
    """||w_j|| * ||H_:,j||: output magnitude of neuron j (Wanda-style, column form)."""
    return w_norm.double() * act_sqsum.double().sqrt()


def activation_scores(act_sqsum: torch.Tensor) -> torch.Tensor:
    return act_sqsum.double().sqrt()


def wanda_sp_scores(W: torch.Tensor, act_sqsum: torch.Tensor) -> torch.Tensor:
    """Wanda-sp: S_j = mean_i |W_ij| * ||X_:,j|| for input channel j of W [out, in]."""
    return W.abs().double().mean(0) * act_sqsum.double().sqrt()


def magnitude_scores(*weights_rows: torch.Tensor) -> torch.Tensor:
    """L2 norm of each neuron's weights over all the matrices it owns (given with neurons as rows)."""
    return torch.sqrt(sum((w.double() ** 2).sum(1) for w in weights_rows))


def fluctuation_scores(W: torch.Tensor, act_var: torch.Tensor) -> torch.Tensor:
    """FLAP: S_j = Var(X_:,j) * ||W_:,j||^2 for input channel j of W [out, in]."""
    return act_var.double() * (W.double() ** 2).sum(0)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over one module's channels (FLAP's per-module standardisation; std unbiased)."""
    x = x.double()
    if x.numel() < 2:
        return torch.zeros_like(x)
    return (x - x.mean()) / x.std().clamp_min(1e-30)


def flap_head_scores(W_o: torch.Tensor, act_var: torch.Tensor, n_kv: int) -> torch.Tensor:
    """FLAP on attention: the fluctuation metric of o_proj's input channels, squared (as FLAP's code does for
    o_proj), standardised over the module, then averaged over the channels of each KV group (its query heads)."""
    ch = standardize(fluctuation_scores(W_o, act_var) ** 2)
    return ch.view(n_kv, -1).mean(1)


def flap_channel_scores(W_down: torch.Tensor, act_var: torch.Tensor) -> torch.Tensor:
    """FLAP on the MLP: the fluctuation metric of down_proj's input channels, standardised over the module."""
    return standardize(fluctuation_scores(W_down, act_var))


def compensation_bias(W: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation: the mean input of the removed channels through their columns,
    b = W[:, removed] @ mean[removed] (the expected output the removed channels contributed)."""
    removed = removed.to(W.device)
    return W[:, removed].double() @ mean.to(W.device).double()[removed]


def taylor_importance(W: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """First-order Taylor importance of each weight, |W . dL/dW| (LLM-Pruner's element-wise `param_first`)."""
    return (W.double() * grad.double()).abs()


def taylor_rows(W: torch.Tensor, grad: torch.Tensor, size: int = 1) -> torch.Tensor:
    """Taylor importance summed over each group of `size` consecutive output rows (neurons, heads)."""
    return taylor_importance(W, grad).sum(1).view(-1, size).sum(1)


def taylor_cols(W: torch.Tensor, grad: torch.Tensor, size: int = 1) -> torch.Tensor:
    """Taylor importance summed over each group of `size` consecutive input columns."""
    return taylor_importance(W, grad).sum(0).view(-1, size).sum(1)


def taylor_mlp_channels(gate, up, down) -> torch.Tensor:
    """LLM-Pruner's coupled MLP channel j: gate row j + up row j + down column j. Each argument is (W, grad);
    gate may be None for non-gated MLPs."""
    s = taylor_rows(*up) + taylor_cols(*down)
    if gate is not None:
        s = s + taylor_rows(*gate)
    return s


def taylor_kv_groups(q, k, v, o, head_dim: int, rep: int) -> torch.Tensor:
    """LLM-Pruner's coupled attention group, GQA-aware: KV head g with its `rep` query heads, i.e. the q rows of
    those query heads, the k and v rows of head g, and the o columns of those query heads. (W, grad) pairs."""
    return (taylor_rows(*q, rep * head_dim) + taylor_rows(*k, head_dim) + taylor_rows(*v, head_dim)
            + taylor_cols(*o, rep * head_dim))


def taylor_kv_groups_folded(q, k, v, o, head_dim: int, rep: int) -> torch.Tensor:
    """The attention group score of LLM-Pruner's own code on GQA models (llama3.py through its torch_pruning):
    the importance vectors of q rows and o columns (n_heads * head_dim long) are aligned with k's
    (n_kv * head_dim) by folding, channel c counting for KV channel c mod (n_kv * head_dim), so query head h is
    credited to KV head h mod n_kv, while the group that is then removed holds query heads g*rep .. g*rep+rep-1.
    Kept to reproduce the official runs; taylor_kv_groups scores the heads that are actually removed."""
    width = k[0].shape[0]
    fold = lambda v: v.view(-1, width).sum(0)  # noqa: E731
    per_channel = (fold(taylor_importance(*q).sum(1)) + fold(taylor_importance(*o).sum(0))
                   + taylor_importance(*k).sum(1) + taylor_importance(*v).sum(1))
    return per_channel.view(-1, head_dim).sum(1)
