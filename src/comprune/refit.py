"""Recovery by least squares (ZipLM, SlimGPT, Týr's local pruner): refitting an output projection's kept columns.

An output projection y = W x (down_proj over the MLP's neurons, o_proj over the query heads' channels) loses input
channels. With H the projection's inputs over the calibration tokens (G = HᵀH) and T the outputs it should still
produce, the best kept weight for a kept set K is the damped least-squares refit

    W'_K = C_Kᵀ (G_KK + λI)⁻¹,   C = Hᵀ T   (f x d),

and C = G Wᵀ when the target is the dense projection on the same inputs. COMP's per-neuron scales are its diagonal
special case. Which channels to drop is obs.py's structured OBS, which assumes this refit.
"""
from __future__ import annotations

import torch

from . import distributed
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

    def summed(self) -> "BlockStats":
        """G, D and the target's energy summed over the ranks' tokens (comprune.distributed), once the block has
        run on every batch; nothing in one process."""
        if distributed.active():
            for t in (self.G, self.D):
                if t is not None:
                    distributed.all_reduce_sum(t)
            self.t_energy = distributed.sum_floats(self.t_energy)[0]
        return self
