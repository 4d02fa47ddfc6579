"""Structured OBS selection (ZipLM, SlimGPT, Týr's local pruner): which input channels of a projection to drop.

Greedy structured OBS on the full least-squares refit W* = Cᵀ (G + λI)⁻¹ (refit.py: G = HᵀH over the projection's
inputs, C = Hᵀ T for the outputs it should still produce): removing channel set R costs tr(W*_R ([G⁻¹]_RR)⁻¹ W*_Rᵀ)
of output energy, and the remaining channels absorb it by W* ← W* − W*_R ([G⁻¹]_RR)⁻¹ [G⁻¹]_R,: (the condition
score ‖w_j‖²/[G⁻¹]_jj, with the columns kept up to date). After the last removal the updated W* equals the refit
of the kept set exactly, which is why the refit is computed directly.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from .scores import downdate_inverse, spd_inverse


@contextmanager
def one_thread():
    """The greedy loop's steps are small (a few MFLOP): extra threads only add synchronisation, which costs up to
    50x on a loaded 2-core host. The inverse and the refit outside it keep every thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def obs_select(G: torch.Tensor, C: torch.Tensor | None, n_remove: int, damp: float, chunk: int = 0,
               groups: torch.Tensor | None = None, per_bucket: torch.Tensor | None = None,
               W: torch.Tensor | None = None, order: list | None = None) -> torch.Tensor:
    """Boolean keep mask over G's channels after removing `n_remove` units greedily by structured OBS cost.

    Units are single channels, or with `groups` [n_units, size] (channel indices per unit, e.g. a query head's
    head_dim channels) whole groups, one at a time. With `per_bucket` (bucket id per unit, e.g. its KV group),
    every bucket loses the same number of units, n_remove / n_buckets each (GQA shapes stay stock).

    With `W` (the dense projection) instead of C, the columns are never updated: COMP's literal condition
    score ‖w_j‖²/[G⁻¹]_jj on the dense weights, with only G⁻¹ downdated as neighbours go. `order`, if given,
    receives the removed channels in the order they went: greedy removal is nested, so its first n entries are
    what a run with n_remove = n removes (with the same chunks)."""
    f = G.shape[0]
    keep = torch.ones(f, dtype=torch.bool, device=G.device)
    if n_remove <= 0:
        return keep
    Ginv = spd_inverse(G, damp)
    update = W is None
    # W* = Cᵀ (G + λI)⁻¹ (d x f), or a private copy of the dense W: the loop zeroes removed columns
    W = C.double().T @ Ginv if update else W.detach().to(G.device, torch.float64, copy=True)
    with one_thread():
        return _greedy(W, Ginv, keep, n_remove, chunk, groups, per_bucket, update, order)


def _greedy(W, Ginv, keep, n_remove, chunk, groups, per_bucket, update=True, order=None):
    if groups is None:
        chunk = chunk or max(1, math.ceil(n_remove / 32))
        removed = 0
        while removed < n_remove:
            cost = (W * W).sum(0) / torch.diagonal(Ginv).clamp_min(1e-300)
            cost[~keep] = float("inf")
            idx = torch.topk(cost, min(chunk, n_remove - removed), largest=False).indices
            _obs_remove(W, Ginv, idx, update)
            keep[idx] = False
            if order is not None:
                order += idx.tolist()  # cheapest first within a chunk
            removed += idx.numel()
        return keep
    groups = groups.to(W.device)
    alive = torch.ones(groups.shape[0], dtype=torch.bool)
    quota = None
    if per_bucket is not None:
        n_buckets = int(per_bucket.max()) + 1
        quota = torch.full((n_buckets,), n_remove // n_buckets, dtype=torch.long)
    for _ in range(n_remove):
        best, best_cost = -1, float("inf")
        for u in torch.nonzero(alive).flatten().tolist():
            if quota is not None and quota[per_bucket[u]] == 0:
                continue
            ch = groups[u]
            WC = W[:, ch]
            c = float((torch.linalg.solve(Ginv[ch][:, ch], WC.T) * WC.T).sum())
            if c < best_cost:
                best, best_cost = u, c
        _obs_remove(W, Ginv, groups[best], update)
        keep[groups[best]] = False
        alive[best] = False
        if quota is not None:
            quota[per_bucket[best]] -= 1
    return keep


def _obs_remove(W: torch.Tensor, Ginv: torch.Tensor, idx: torch.Tensor, update: bool = True):
    """Remove channels idx: the others absorb their output (W updated in place), and Ginv is downdated."""
    if update:
        W.sub_(W[:, idx] @ torch.linalg.solve(Ginv[idx][:, idx], Ginv[idx, :]))
    W[:, idx] = 0
    downdate_inverse(Ginv, idx)
