"""COMP's attention stage: heads leave each kept block before its MLP is pruned, on the same inputs.

Two units. Query heads inside GQA groups (head_unit="query", the default): every KV group loses the same number,
so stock GQA shapes hold. Whole KV groups with their query heads (head_unit="kv"): coarser, and the paper's
reading. Both are chosen by structured OBS over o_proj's input channels (a head is a group of head_dim channels)
and recovered in o_proj: a least-squares refit of the kept columns, or (recovery="scales") one scale per kept
query head. `acts` is only read in both: the MLP stage runs the block again on the same inputs.
"""
from __future__ import annotations

import torch

from ..masktune import error_from_gram, solve_scales
from ..obs import obs_select
from ..refit import BlockStats, dense_cross, refit, residual
from ..surgery import attention_parts, kv_group_channels, prune_heads, prune_query_heads
from ..walk import collect_stats


def _o_stats(layer, adapter, acts, parts, cfg):
    """G (token-weighted when cfg says so) of o_proj's input channels over the calibration batches."""
    own = BlockStats(parts.o, cfg.token_weight, normed=adapter.output_norms) if cfg.token_weight != "none" else None
    hooks = own.attach(layer) if own is not None else []
    try:
        stats, _ = collect_stats(layer, acts, {"o": parts.o}, gram=set() if own else {"o"}, keep_outputs=False)
    finally:
        for h in hooks:
            h.remove()
    return own.summed().G if own is not None else stats["o"].gram


def _refit_record(G, C, W, keep_ch, cfg) -> tuple[torch.Tensor | None, dict]:
    """The refitted kept o_proj columns and the relative output errors before and after the refit."""
    new_o = refit(G, C, keep_ch, cfg.damp) if cfg.mask_tuning else None
    energy = float((C.T * W.double().to(G.device)).sum())
    kc = keep_ch.nonzero().flatten()
    err_pruned = residual(G, C, energy, kc, W.double().to(G.device)[:, kc])
    err_tuned = residual(G, C, energy, kc, new_o) if new_o is not None else err_pruned
    return new_o, {"head_rel_error_pruned": err_pruned / max(energy, 1e-30),
                   "head_rel_error_tuned": err_tuned / max(energy, 1e-30)}


@torch.inference_mode()
def prune_block_query_heads(layer, adapter, acts, per_group: int, cfg) -> dict:
    """Remove `per_group` query heads from every KV group by structured OBS over each head's o_proj channels,
    then refit the kept o_proj columns against the dense attention output on the same inputs."""
    parts = attention_parts(adapter, layer)
    G = _o_stats(layer, adapter, acts, parts, cfg)
    W = parts.o.weight.detach()
    hd, nh = parts.head_dim, parts.n_heads
    C = dense_cross(G, W)
    heads = torch.arange(nh * hd).view(nh, hd)
    keep_ch = obs_select(G, C, per_group * parts.n_kv, cfg.damp, groups=heads,
                            per_bucket=torch.arange(nh) // parts.rep)
    new_o, rec = _refit_record(G, C, W, keep_ch, cfg)
    kept = keep_ch.view(nh, hd)[:, 0].cpu().nonzero().flatten()
    prune_query_heads(adapter, layer, kept, new_o)
    return {"kept_query_heads": kept.tolist(), **rec}


@torch.inference_mode()
def prune_block_heads(layer, adapter, acts, n_groups: int, cfg) -> dict:
    """Remove `n_groups` KV groups (each with its query heads).

    With G the Gram of o_proj's input channels and C a group's channels, removing the group after the best
    re-weighting of the other channels costs tr(W_C ([G⁻¹]_CC)⁻¹ W_Cᵀ) of output energy; for one channel this is
    ‖w_j‖²/[G⁻¹]_jj, the MLP's score. With least-squares recovery the columns follow the OBS updates and the kept
    o_proj is refitted; with scales (the paper's reading) the dense columns score and one scale per kept query
    head is fitted."""
    parts = attention_parts(adapter, layer)
    G = _o_stats(layer, adapter, acts, parts, cfg)
    W = parts.o.weight.detach()
    groups = kv_group_channels(parts, torch.arange(parts.n_kv))[0].view(parts.n_kv, -1)
    if cfg.recovery == "least-squares":
        C = dense_cross(G, W)
        keep_ch = obs_select(G, C, n_groups, cfg.damp, groups=groups)
        new_o, rec = _refit_record(G, C, W, keep_ch, cfg)
        keep_kv = keep_ch.view(parts.n_kv, -1)[:, 0].cpu().nonzero().flatten()
        prune_heads(adapter, layer, keep_kv, o_weight=new_o)
        return {"kept_kv_heads": keep_kv.tolist(), **rec}
    keep_ch = obs_select(G, None, n_groups, cfg.damp, groups=groups, W=W)
    keep_kv = keep_ch.view(parts.n_kv, -1)[:, 0].cpu().nonzero().flatten()
    hd, nh = parts.head_dim, parts.n_heads
    Wd = W.double().to(G.device)
    K = (Wd.T @ Wd).mul_(G).reshape(nh, hd, nh, hd).sum((1, 3))  # Gram of the query heads' output contributions
    keep = keep_ch.view(nh, hd)[:, 0]
    scales = solve_scales(K, keep, cfg.ridge) if cfg.mask_tuning else None
    energy = error_from_gram(K, torch.zeros_like(keep))
    rec = {"kept_kv_heads": keep_kv.tolist(), "head_rel_error_pruned": error_from_gram(K, keep) / max(energy, 1e-30),
           "head_rel_error_tuned": error_from_gram(K, keep, scales) / max(energy, 1e-30)}
    if scales is not None:
        rec["head_scales"] = [float(x) for x in scales]
    prune_heads(adapter, layer, keep_kv, scales)
    return rec
