"""wanda-sp: MLP neurons by mean_i |W_ij| * ||X_:,j|| on down_proj inputs, uniform per layer, sequential (each
block sees the pruned blocks before it, Wanda's loop), no compensation; on mixture-of-experts blocks the same
score per expert on the tokens routed to it. magnitude: MLP neurons by the L2 norm of their weights (gate/up
rows, down column), uniform per layer, data-free."""
from __future__ import annotations

from .. import scores as S
from ..registry import Method, register
from ..sequential import walk_blocks
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


def run_wanda_sp(walk, acts) -> dict:
    adapter, cfg, budget = walk.adapter, walk.cfg, walk.budget

    def step(i, layer, acts, plan, carry):
        if getattr(adapter, "moe", False):
            rec = _wanda_sp_moe(layer, adapter, acts, budget.neurons_per_layer)
            return record(adapter, layer, **rec), forward_block(layer, acts, consume=True)
        parts = adapter.mlp(layer)
        stats, _ = collect_stats(layer, acts, {"down": parts.down}, forward=True, keep_outputs=False)
        score = S.wanda_sp_scores(parts.down.weight.detach(), stats["down"].sqnorm())
        idx = as_index(keep_lowest_removed(score, uniform_n_remove(adapter, layer, budget, cfg)))
        prune_mlp(adapter, layer, idx)
        acts = forward_block(layer, acts, consume=True)
        return record(adapter, layer, kept_neurons=idx.tolist(), width=int(idx.numel())), acts

    _, blocks, _ = walk_blocks(walk, acts, step, desc="wanda-sp")
    return {"removed_layers": [], "blocks": blocks}


def run_magnitude(walk, acts) -> dict:
    """Data-free: the calibration pass is not used."""
    adapter, cfg, budget = walk.adapter, walk.cfg, walk.budget

    def step(i, layer, acts, plan, carry):
        if getattr(adapter, "moe", False):
            return record(adapter, layer, **prune_experts_by(
                adapter, layer, budget.neurons_per_layer, lambda e, ex: S.magnitude_scores(
                    ex.up_proj.weight.detach(), ex.down_proj.weight.detach().T, ex.gate_proj.weight.detach()))), None
        parts = adapter.mlp(layer)
        rows = [parts.up.weight, parts.down.weight.T] + ([parts.gate.weight] if parts.gate is not None else [])
        score = S.magnitude_scores(*[w.detach() for w in rows])
        idx = as_index(keep_lowest_removed(score, uniform_n_remove(adapter, layer, budget, cfg)))
        prune_mlp(adapter, layer, idx)
        return record(adapter, layer, kept_neurons=idx.tolist(), width=int(idx.numel())), None

    _, blocks, _ = walk_blocks(walk, None, step, desc="magnitude")
    return {"removed_layers": [], "blocks": blocks}


register(Method("wanda-sp", run_wanda_sp, help="Wanda-SP: MLP neurons by |W|·||X||, uniform, sequential",
                plan_budget=plan_neurons_only, resumable=True))
register(Method("magnitude", run_magnitude, help="MLP neurons by their weights' L2 norm, data-free",
                plan_budget=plan_neurons_only, resumable=True, streams=False))
