"""Mixture-of-experts layers (Qwen3-MoE, Mixtral, OLMoE) as one small gated MLP per expert, and back.

transformers 5 stores a layer's experts as two 3-D tensors, gate_up_proj [E, 2I, H] (gate rows first) and
down_proj [E, H, I], beside a top-k router whose weight is [E, H]. While pruning, ExpertList holds one
nn.Linear per projection and expert, so an expert's neurons are sliced like a dense MLP's and an expert is
removed by dropping its entry (and its router row). Its forward is the family's own: the same routing, the same
order of accumulation. `stack` writes the (pruned) experts back into the family's 3-D layout, what its
checkpoints and llama.cpp hold.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn


class ExpertMLP(nn.Module):
    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down


class ExpertList(nn.Module):
    """A layer's experts, one ExpertMLP each. `observers` are called per routed expert with
    (expert index, its tokens' inputs, intermediate activations, routing weights, unweighted outputs): how the
    pruner collects per-expert statistics without a second forward."""

    def __init__(self, experts: list[ExpertMLP], act_fn, template: nn.Module):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.act_fn = act_fn
        self.observers: list = []
        object.__setattr__(self, "template", template)  # the family's module, refilled by `stack`; not a child

    @contextmanager
    def observing(self, observer):
        """`observer` sees every routed expert's tokens while the block runs inside this context."""
        self.observers.append(observer)
        try:
            yield observer
        finally:
            self.observers.remove(observer)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def width(self) -> int:
        return self.experts[0].down_proj.in_features if len(self.experts) else 0

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.bincount(top_k_index.flatten(), minlength=self.num_experts).nonzero().flatten().tolist()
        for e in hit:
            token_idx, top_k_pos = torch.where(top_k_index == e)
            x = hidden_states[token_idx]
            ex = self.experts[e]
            a = self.act_fn(ex.gate_proj(x)) * ex.up_proj(x)
            y = ex.down_proj(a)
            w = top_k_weights[token_idx, top_k_pos, None]
            for obs in self.observers:
                obs(e, x, a, w, y)
            out.index_add_(0, token_idx, (y * w).to(out.dtype))
        return out


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return lin


@torch.no_grad()
def split(experts: nn.Module) -> ExpertList:
    """The family's 3-D experts module as an ExpertList (copies; the 3-D tensors are released)."""
    gu, down = experts.gate_up_proj, experts.down_proj
    inter = down.shape[-1]
    parts = [ExpertMLP(_linear(gu[e, :inter]), _linear(gu[e, inter:]), _linear(down[e])) for e in range(gu.shape[0])]
    lst = ExpertList(parts, experts.act_fn, experts)
    experts.gate_up_proj = nn.Parameter(gu.new_empty(0), requires_grad=False)
    experts.down_proj = nn.Parameter(down.new_empty(0), requires_grad=False)
    return lst


@torch.no_grad()
def stack(lst: ExpertList) -> nn.Module:
    """The ExpertList written back into its family's 3-D module (counts and width updated)."""
    mod = lst.template
    mod.gate_up_proj = nn.Parameter(torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in lst.experts]),
                                    requires_grad=False)
    mod.down_proj = nn.Parameter(torch.stack([e.down_proj.weight for e in lst.experts]), requires_grad=False)
    mod.num_experts = lst.num_experts
    mod.intermediate_dim = lst.width
    return mod
