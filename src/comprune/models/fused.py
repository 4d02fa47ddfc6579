"""Fused projections (Phi-3's qkv_proj, gate_up_proj) as their parts, and back.

A SplitLinear holds one nn.Linear per part and returns their outputs concatenated, so the family's own forward
(which slices or chunks the fused output) runs unchanged while each part is sliced on its own: a neuron owns
row j of the gate part and row j of the up part, a KV group its rows of q, k and v. Fusing concatenates the
parts' (pruned) weights into one nn.Linear again, the layout the family's checkpoints have.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class SplitLinear(nn.Module):
    def __init__(self, parts: list[nn.Linear]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    @property
    def weight(self) -> torch.Tensor:  # what code reading the fused weight (dtype, device) sees
        return self.parts[0].weight

    def forward(self, x):
        return torch.cat([p(x) for p in self.parts], dim=-1)


@torch.no_grad()
def split(lin: nn.Linear, sizes: list[int]) -> SplitLinear:
    """`lin` as consecutive row blocks of `sizes` (their weights are copies; `lin` can go)."""
    parts, start = [], 0
    for n in sizes:
        p = nn.Linear(lin.in_features, n, bias=lin.bias is not None, device="meta")
        p.weight = nn.Parameter(lin.weight[start:start + n].clone(), requires_grad=lin.weight.requires_grad)
        if lin.bias is not None:
            p.bias = nn.Parameter(lin.bias[start:start + n].clone(), requires_grad=lin.bias.requires_grad)
        parts.append(p)
        start += n
    if start != lin.out_features:
        raise ValueError(f"split: sizes {sizes} do not add up to {lin.out_features} rows")
    return SplitLinear(parts)


@torch.no_grad()
def fuse(split_lin: SplitLinear) -> nn.Linear:
    parts = list(split_lin.parts)
    has_bias = parts[0].bias is not None
    lin = nn.Linear(split_lin.in_features, split_lin.out_features, bias=has_bias, device="meta")
    lin.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
    if has_bias:
        lin.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return lin
