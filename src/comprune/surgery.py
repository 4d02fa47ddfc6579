"""Physical removal: slice MLP neurons, attention heads and experts, drop whole blocks, renumber.

The result is a plain model of the same architecture, fewer layers and narrower MLPs, whose logits equal
the masked-and-scaled dense model's. finalize_config then records its shapes in the config models/schema.py
chooses for them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import CompruneError
from .models.families import family_of
from .models.schema import PER_LAYER_KEYS, write_config


def _set_param(lin: nn.Linear, name: str, value: torch.Tensor | None):
    if value is None:
        setattr(lin, name, None)
    else:
        setattr(lin, name, nn.Parameter(value.contiguous(), requires_grad=False))


@torch.no_grad()
def slice_rows(lin: nn.Linear, keep: torch.Tensor):
    """Keep output rows `keep` (neurons of gate/up, heads of q/k/v)."""
    keep = keep.to(lin.weight.device)
    _set_param(lin, "weight", lin.weight[keep].clone())
    if lin.bias is not None:
        _set_param(lin, "bias", lin.bias[keep].clone())
    lin.out_features = int(keep.numel())


@torch.no_grad()
def slice_cols(lin: nn.Linear, keep: torch.Tensor, scales: torch.Tensor | None = None):
    """Keep input columns `keep` (neurons of down, heads of o), folding per-column scales into the weight."""
    keep = keep.to(lin.weight.device)
    w = lin.weight[:, keep].clone()
    if scales is not None:
        w *= scales.to(device=w.device, dtype=torch.float64).to(w.dtype)[None, :]
    _set_param(lin, "weight", w)
    lin.in_features = int(keep.numel())


def as_index(keep: torch.Tensor) -> torch.Tensor:
    return keep.nonzero().flatten() if keep.dtype == torch.bool else keep.sort().values


def prune_mlp(adapter, layer, keep: torch.Tensor, scales: torch.Tensor | None = None):
    """Keep MLP neurons `keep` (mask or indices, sorted) with optional scales folded into down_proj."""
    idx = as_index(keep)
    parts = adapter.mlp(layer)
    for lin in (parts.gate, parts.up):
        if lin is not None:
            slice_rows(lin, idx)
    slice_cols(parts.down, idx, scales)
    mlp = adapter.mlp_module(layer)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(idx.numel())


def mlp_width(adapter, layer) -> int:
    if getattr(adapter, "moe", False):
        return adapter.experts(layer).width
    return adapter.mlp(layer).down.in_features


@torch.no_grad()
def prune_experts(adapter, layer, keep: torch.Tensor):
    """Keep experts `keep` (sorted indices) of a mixture-of-experts layer, and their router rows."""
    lst, router = adapter.experts(layer), adapter.router(layer)
    idx = keep.tolist()
    top_k = int(getattr(router, "top_k", 1))
    if len(idx) < top_k:
        raise CompruneError(f"a layer would keep {len(idx)} experts but routes every token to {top_k}: "
                            "lower --ratio or --expert-share")
    lst.experts = nn.ModuleList([lst.experts[i] for i in idx])
    _set_param(router, "weight", router.weight[keep.to(router.weight.device)].clone())
    router.num_experts = len(idx)
    if hasattr(router, "bias") and isinstance(router.bias, torch.Tensor):  # routers with a per-expert bias
        _set_param(router, "bias", router.bias[keep.to(router.bias.device)].clone())


@torch.no_grad()
def prune_expert_neurons(adapter, layer, keep: list[torch.Tensor], downs: list[torch.Tensor | None]):
    """Keep neurons keep[e] of every expert e (one width for all), with its refitted down_proj where given."""
    lst = adapter.experts(layer)
    if len({int(k.numel()) for k in keep}) > 1:
        raise ValueError("prune_expert_neurons: every expert of a layer keeps the same number of neurons")
    for ex, idx, new in zip(lst.experts, keep, downs):
        slice_rows(ex.gate_proj, idx)
        slice_rows(ex.up_proj, idx)
        slice_cols(ex.down_proj, idx)
        if new is not None:
            ex.down_proj.weight.copy_(new.to(ex.down_proj.weight.dtype))


@dataclass(frozen=True)
class AttnParts:
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    head_dim: int

    @property
    def n_heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def n_kv(self) -> int:
        return self.k.out_features // self.head_dim

    @property
    def rep(self) -> int:
        """Query heads per KV head (GQA group size); query head h reads KV head h // rep."""
        return self.n_heads // max(self.n_kv, 1)

    def group_params(self) -> int:
        """Parameters owned by one KV group: its q/k/v rows and o columns (biases included)."""
        d = self.q.in_features
        n = self.head_dim * d * (2 * self.rep + 2)
        n += self.head_dim * self.rep * (self.q.bias is not None)
        n += self.head_dim * ((self.k.bias is not None) + (self.v.bias is not None))
        return n

    def query_head_params(self) -> int:
        """Parameters owned by one query head: its q rows (and bias) and o columns."""
        d = self.q.in_features
        return self.head_dim * (2 * d + (self.q.bias is not None))


def attention_parts(adapter, layer) -> AttnParts:
    """q/k/v/o of a Llama-style attention block and its head geometry (read from the weights, so it also
    holds for already-pruned layers)."""
    attn = adapter.attention(layer)
    q, k, v, o = adapter.attention_linears(layer)
    head_dim = int(getattr(attn, "head_dim", 0) or o.in_features // attn.config.num_attention_heads)
    return AttnParts(q, k, v, o, head_dim)


def attention_heads(adapter, layer) -> tuple[int, int]:
    p = attention_parts(adapter, layer)
    return p.n_heads, p.n_kv


def kv_group_channels(parts: AttnParts, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query/o channel indices, key/value channel indices) owned by KV heads `kv` (sorted indices)."""
    hd, rep = parts.head_dim, parts.rep
    kv = kv.to(torch.long)
    qo = (kv[:, None] * rep * hd + torch.arange(rep * hd)[None, :]).flatten()
    kvc = (kv[:, None] * hd + torch.arange(hd)[None, :]).flatten()
    return qo, kvc


def check_head_pruning(adapter, config):
    """One line naming why this model's heads cannot be pruned, or nothing."""
    reason = adapter.head_pruning_refusal(config)
    if reason:
        raise CompruneError(reason)


def _set_head_counts(attn, n_heads: int, n_kv: int):
    for name, val in (("num_heads", n_heads), ("num_attention_heads", n_heads), ("num_key_value_heads", n_kv)):
        if hasattr(attn, name):
            setattr(attn, name, val)
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = n_heads // max(n_kv, 1)
    # Phi-3's forward splits its fused qkv at config.num_attention_heads: that attention gets its own config copy
    if hasattr(attn, "qkv_proj") and getattr(attn, "config", None) is not None:
        attn.config = copy.copy(attn.config)
        attn.config.num_attention_heads, attn.config.num_key_value_heads = n_heads, n_kv


@torch.no_grad()
def prune_heads(adapter, layer, keep_kv: torch.Tensor, scales: torch.Tensor | None = None,
                o_weight: torch.Tensor | None = None):
    """GQA-aware head pruning: keep KV heads `keep_kv` (mask or indices) together with all their query heads
    (q/k/v rows, o columns), so every kept KV head still serves the same number of query heads.
    `scales` (one per kept query head) are folded into the o_proj columns; `o_weight` [d, kept channels]
    replaces them instead (a least-squares refit)."""
    parts = attention_parts(adapter, layer)
    idx = as_index(keep_kv)
    if idx.numel() == 0:
        raise ValueError("prune_heads: at least one KV head must be kept")
    qo, kvc = kv_group_channels(parts, idx)
    slice_rows(parts.q, qo)
    slice_rows(parts.k, kvc)
    slice_rows(parts.v, kvc)
    col_scales = None if scales is None else scales.repeat_interleave(parts.head_dim)
    slice_cols(parts.o, qo, col_scales)
    if o_weight is not None:
        parts.o.weight.copy_(o_weight.to(parts.o.weight.dtype))
    _set_head_counts(adapter.attention(layer), int(idx.numel()) * parts.rep, int(idx.numel()))


@torch.no_grad()
def prune_query_heads(adapter, layer, keep_heads: torch.Tensor, o_weight: torch.Tensor | None = None):
    """Keep query heads `keep_heads` (mask or indices; the same number in every KV group, so query head h still
    reads KV head h // rep): their q rows and o columns go, k/v stay. `o_weight` [d, kept channels] replaces the
    kept o_proj columns (a least-squares refit)."""
    parts = attention_parts(adapter, layer)
    idx = as_index(keep_heads)
    per_group = torch.bincount(idx // parts.rep, minlength=parts.n_kv)
    if idx.numel() == 0 or int(per_group.min()) != int(per_group.max()):
        raise ValueError("prune_query_heads: every KV group must keep the same, non-zero number of query heads")
    ch = (idx[:, None] * parts.head_dim + torch.arange(parts.head_dim)[None, :]).flatten()
    slice_rows(parts.q, ch)
    slice_cols(parts.o, ch)
    if o_weight is not None:
        parts.o.weight.copy_(o_weight.to(parts.o.weight.dtype))
    _set_head_counts(adapter.attention(layer), int(idx.numel()), parts.n_kv)


def supports_biases(model) -> bool:
    return family_of(model.config).bias_flags is not None


@torch.no_grad()
def enable_biases(model, adapter) -> bool:
    """Turn on the family's bias flags and give every attention/MLP linear a (zero) bias where it has none, so
    compensation biases can be stored and the saved model reloads with them. False if the family cannot."""
    flags = family_of(model.config).bias_flags
    if flags is None:
        return False
    for layer in adapter.layers(model):
        parts = attention_parts(adapter, layer)
        mlp = adapter.mlp(layer)
        for lin in (parts.q, parts.k, parts.v, parts.o, mlp.gate, mlp.up, mlp.down):
            if lin is not None and lin.bias is None:
                _set_param(lin, "bias", torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                    device=lin.weight.device))
    for flag in flags.values():
        setattr(model.config, flag, True)
    return True


@torch.no_grad()
def add_bias(lin: nn.Linear, value: torch.Tensor):
    """lin.bias += value (creating the bias if needed)."""
    value = value.to(device=lin.weight.device, dtype=lin.weight.dtype)
    _set_param(lin, "bias", value.clone() if lin.bias is None else lin.bias + value)


def drop_layers(model, adapter, remove) -> list[int]:
    """Drop blocks `remove` (original indices), renumber the rest (KV-cache slots follow). Returns kept indices."""
    remove = set(int(i) for i in remove)
    layers = adapter.layers(model)
    n = len(layers)
    kept = [i for i in range(n) if i not in remove]
    new_layers = [layers[i] for i in kept]
    for new_idx, layer in enumerate(new_layers):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
    adapter.set_layers(model, new_layers)
    cfg = model.config
    for key in PER_LAYER_KEYS + adapter.per_layer_keys:
        val = getattr(cfg, key, None)
        if isinstance(val, (list, tuple)) and len(val) == n:
            setattr(cfg, key, [val[i] for i in kept])
    cfg.num_hidden_layers = len(kept)
    return kept


def finalize_config(model, adapter) -> list[int]:
    """Record the layers' MLP widths (and attention head counts) in the config, the one models/schema.py chooses."""
    layers = adapter.layers(model)
    widths = [mlp_width(adapter, layer) for layer in layers]
    heads = [attention_heads(adapter, layer) for layer in layers]
    write_config(model, adapter, widths, heads)
    return widths
