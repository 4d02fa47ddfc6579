"""Recovery by least squares, and the structured OBS selection that assumes it (ZipLM, SlimGPT, Týr's local pruner).

An output projection y = W x (down_proj over the MLP's neurons, o_proj over the query heads' channels) loses input
channels. With H the projection's inputs over the calibration tokens (G = HᵀH) and T the outputs it should still
produce, the best kept weight for a kept set K is the damped least-squares refit

    W'_K = C_Kᵀ (G_KK + λI)⁻¹,   C = Hᵀ T   (f x d),

and C = G Wᵀ when the target is the dense projection on the same inputs. COMP's per-neuron scales are its diagonal
special case. Which channels to drop is decided by greedy structured OBS on the full refit W* = Cᵀ (G + λI)⁻¹:
removing channel set R costs tr(W*_R ([G⁻¹]_RR)⁻¹ W*_Rᵀ) of output energy, and the remaining channels absorb it by
W* ← W* − W*_R ([G⁻¹]_RR)⁻¹ [G⁻¹]_R,: (the condition score ‖w_j‖²/[G⁻¹]_jj, with the columns kept up to date).
After the last removal the updated W* equals the refit above exactly, which is why the refit is computed directly.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from .scores import downdate_inverse, spd_inverse
from .walk import block_output


def damping(G: torch.Tensor, damp: float) -> float:
    """λ = damp · mean(diag G): the ridge every refit and OBS step of one projection shares."""
    return float(damp * torch.diagonal(G).double().mean().clamp_min(1e-12))


def dense_cross(G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """C = G Wᵀ: the cross term when the target is the dense projection's own output on the same inputs."""
    return G.double() @ W.double().to(G.device).T


def refit(G: torch.Tensor, C: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """W'_K = C_Kᵀ (G_KK + λI)⁻¹ [d, |K|] (keep: boolean mask or indices; λ from the whole G)."""
    lam = damping(G, damp)
    A = G.double()[keep][:, keep]
    torch.diagonal(A).add_(lam)
    return torch.linalg.solve(A, C.double()[keep]).T


def residual(G: torch.Tensor, C: torch.Tensor, t_energy: float, keep: torch.Tensor, W_K: torch.Tensor) -> float:
    """Σ_tokens ‖T − H_K W_Kᵀ‖² from the statistics alone (t_energy = Σ‖T‖²)."""
    Wk = W_K.double().to(G.device)
    cross = float((Wk * C.double()[keep].T).sum())
    quad = float(((Wk @ G.double()[keep][:, keep]) * Wk).sum())
    return t_energy - 2 * cross + quad


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



class BlockStats:
    """The refit's statistics of one output projection, accumulated batch by batch while its block runs, for
    what a plain Gram HᵀH cannot express:
    - token weights (weight="output"): each token's squared error counts relative to the block output's mean
      square there, w_t = 1 / mean(y_t²), as the next RMSNorm sees it. Without them a few tokens with massive
      activations (the attention sink at position 0: ~100x the median residual norm in SmolLM2) own most of G
      and the fit serves them alone. Where a norm sits between the projection and its residual add (Gemma's and
      OLMo 2's post_attention/post_feedforward_layernorm, normed=True), that norm is the next one and it sees
      the projection's output m: w_t = 1 / mean(m_t²). On Gemma 3 270M at 20 % that took held-out perplexity
      from 94.76 / 74.39 (the block output's scale) to 73.61 / 52.46 (docs/ablation.md);
    - a moved target (target=(batches, weight)): D = Σ Hᵀ W_t · w(T − y) (f x d; y the dense block's output
      on the pruned inputs, T the target batch) and the target's energy Σ w_t ‖H Wᵀ + w(T − y)‖².
    G = Σ Hᵀ W_t H; the refit's cross term becomes G Wᵀ + D."""

    def __init__(self, lin, weight: str = "none", target=None, normed: bool = False):
        self.lin, self.weighted, self.normed = lin, weight == "output", normed
        self.batches, self.mix = target if target is not None else (None, 0.0)
        self.G, self.D, self.t_energy, self.i, self.hm = None, None, 0.0, 0, None

    def attach(self, layer) -> list:
        """Hooks on the projection (its input and output) and on the block (its output); remove them after."""
        return [self.lin.register_forward_hook(self._keep), layer.register_forward_hook(self._accumulate)]

    def _keep(self, module, args, out):
        self.hm = (args[0].reshape(-1, args[0].shape[-1]), out.reshape(-1, out.shape[-1]))

    def _accumulate(self, module, args, out):
        y = block_output(out).float().reshape(-1, self.lin.out_features)
        (h, m), self.hm = self.hm, None
        h = h.float()
        # The projection's own output, as the forward computed it: the refit models H Wᵀ, so a bias is taken out.
        raw = m.float()
        m = raw if self.lin.bias is None else raw - self.lin.bias.float()
        # the scale the next norm divides by: the projection's own output (normed), else the block's
        w = 1.0 / (raw if self.normed else y).pow(2).mean(1).clamp_min(1e-12) if self.weighted else None
        hw = h * w[:, None] if w is not None else h
        g = (hw.T @ h).double()
        self.G = g if self.G is None else self.G.add_(g)
        if self.batches is not None:
            t = self.batches[self.i].to(y.device).float().reshape(-1, y.shape[-1])
            diff = (t - y).mul_(self.mix)
            d = (hw.T @ diff).double()
            self.D = d if self.D is None else self.D.add_(d)
            m = m + diff
        self.i += 1
        e = m.pow(2).sum(1)
        self.t_energy += float((e * w).sum() if w is not None else e.sum())
