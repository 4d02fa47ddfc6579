"""wanda-sp: MLP neurons by mean_i |W_ij| * ||X_:,j|| on down_proj inputs, uniform per layer, sequential (each
block sees the pruned blocks before it, Wanda's loop), no compensation; on mixture-of-experts blocks the same
score per expert on the tokens routed to it."""
from __future__ import annotations

from .. import scores as S
from ..registry import Method, register
from ..surgery import as_index, prune_mlp
from ..walk import collect_stats, forward_block
from .baseline_parts import RoutedMoments, prune_experts_by, record, uniform_n_remove
from ..budget.plan import plan_neurons_only
from .common import keep_lowest_removed


def _wanda_sp_moe(layer, adapter, acts, n_remove: int) -> dict:
    lst = adapter.experts(layer)
    with lst.observing(RoutedMoments(lst.num_experts, lst.width)) as st:
        forward_block(layer, acts, keep=False)
    return prune_experts_by(adapter, layer, n_remove, lambda e, ex: S.wanda_sp_scores(
        ex.down_proj.weight.detach(), st.sqnorm(e)))


def step(walk, i, layer, acts, plan, carry):
    """Sequential: stats of block i come from the already-pruned blocks before it (Wanda's loop)."""
    adapter = walk.adapter
    if getattr(adapter, "moe", False):
        rec = _wanda_sp_moe(layer, adapter, acts, walk.budget.neurons_per_layer)
        return record(adapter, layer, **rec), forward_block(layer, acts, consume=True)
    parts = adapter.mlp(layer)
    stats, _ = collect_stats(layer, acts, {"down": parts.down}, forward=True, keep_outputs=False)
    score = S.wanda_sp_scores(parts.down.weight.detach(), stats["down"].sqnorm())
    idx = as_index(keep_lowest_removed(score, uniform_n_remove(adapter, layer, walk.budget, walk.cfg)))
    prune_mlp(adapter, layer, idx)
    acts = forward_block(layer, acts, consume=True)
    return record(adapter, layer, kept_neurons=idx.tolist(), width=int(idx.numel())), acts


register(Method("wanda-sp", step, plan_budget=plan_neurons_only,
                help="Wanda-SP: MLP neurons by |W|·||X||, uniform, sequential"))
