"""The dense model's next-token distributions on a set of windows, kept as the width search keeps them (three
small per-token moments of a linear LM head, or float16 log-probabilities under a soft-cap), never the full
vocabulary's logits: captured before a prune changes the model, then the KL of any later model against them.

In a process group each rank keeps its part of every batch's windows (`distributed.part`) and the KL is summed
over the ranks with its token counts, so a step or an evaluation covers the same windows as in one process."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .. import distributed
from ..methods.search.fitness import _Moments, dense_moments, kl_sum
from ..models import get_adapter


def model_outputs(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the LM head's input, the logits) of a causal LM on windows `ids` [b, T]: the head's input is what the
    moments pair with (Σ p z = x · Wᵀp / s + p · b / s)."""
    seen = {}
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.__setitem__("x", a[0]))
    try:
        z = model(input_ids=ids, use_cache=False).logits
    finally:
        hook.remove()
    return seen["x"], z


def trainable_copies(model):
    """Replace parameters and buffers made under inference mode (the walk's surgery) by ordinary copies, which
    autograd may save for a backward pass; tied weights stay tied."""
    done = {}
    for mod in model.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is None or not t.is_inference():
                    continue
                if id(t) not in done:
                    c = t.detach().clone()
                    done[id(t)] = torch.nn.Parameter(c, requires_grad=False) if isinstance(t, torch.nn.Parameter) else c
                table[name] = done[id(t)]


def _to(ref, device):
    if isinstance(ref, _Moments):
        return _Moments(ref.m.to(device), ref.const.to(device), ref.mass.to(device))
    return ref.to(device)


@dataclass
class DenseTargets:
    """Windows in batches and, per batch, what the KL against the dense model needs of its distributions: in a
    process group, this rank's part of each batch (possibly none); `digest` and `tokens` are every rank's."""
    ids: list[torch.Tensor]
    refs: list
    digest: str = ""
    tokens: int = 0

    @classmethod
    @torch.no_grad()  # not inference mode: the targets enter the tuning's autograd graph
    def capture(cls, model, ids: torch.Tensor, batch_size: int = 4, device="cpu") -> "DenseTargets":
        linear = not getattr(model.config, "final_logit_softcapping", None)
        head = model.get_output_embeddings()
        digest, tokens = _sha(ids), ids.numel()
        ids = get_adapter(model).windows(model, ids)  # as the walk reads them: <bos> first where the family needs it
        batches, refs = [b[distributed.part(b.shape[0])] for b in ids.split(batch_size)], []
        for b in batches:
            if not b.numel():
                refs.append(None)
                continue
            _, z = model_outputs(model, b.to(device))
            logp = torch.log_softmax(z.float(), -1)
            ref = dense_moments(logp, head, model.config) if linear else logp.half()
            refs.append(_to(ref, "cpu"))
        return cls(batches, refs, digest, tokens)

    def sha256(self) -> str:
        return self.digest

    def batch(self, k: int, device="cpu"):
        return self.ids[k].to(device), (_to(self.refs[k], device) if self.refs[k] is not None else None)

    def loss_sum(self, model, k: int, device="cpu") -> tuple[torch.Tensor | None, int]:
        """(Σ KL(dense ‖ model) over this rank's tokens of batch k (differentiable; None when it has none), their
        number)."""
        ids, ref = self.batch(k, device)
        if not ids.numel():
            return None, 0
        x, z = model_outputs(model, ids)
        return kl_sum(ref, x, z), ids.numel()

    def loss(self, model, k: int, device="cpu") -> torch.Tensor:
        """Mean per-token KL(dense ‖ model) on batch k (differentiable; one process)."""
        total, n = self.loss_sum(model, k, device)
        return total / n

    @torch.inference_mode()
    def kl(self, model, device="cpu") -> float:
        """Mean per-token KL(dense ‖ model) over every window (every rank's)."""
        total, n = 0.0, 0
        for k in range(len(self.ids)):
            part, m = self.loss_sum(model, k, device)
            if part is not None:
                total, n = total + float(part), n + m
        total, n = distributed.sum_floats(total, n)
        return total / max(n, 1)


def _sha(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
