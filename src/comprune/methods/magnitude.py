"""magnitude: MLP neurons by the L2 norm of their weights (gate/up rows, down column), uniform per layer,
data-free."""
from __future__ import annotations

from .. import scores as S
from ..budget.plan import plan_neurons_only
from ..registry import Method, register
from ..surgery import as_index, prune_mlp
from .baseline_parts import prune_experts_by, record, uniform_n_remove
from .common import keep_lowest_removed


def step(walk, i, layer, acts, plan, carry):
    """Data-free: the calibration activations are not used."""
    adapter = walk.adapter
    if getattr(adapter, "moe", False):
        return record(adapter, layer, **prune_experts_by(
            adapter, layer, walk.budget.neurons_per_layer, lambda e, ex: S.magnitude_scores(
                ex.up_proj.weight.detach(), ex.down_proj.weight.detach().T, ex.gate_proj.weight.detach()))), None
    parts = adapter.mlp(layer)
    rows = [parts.up.weight, parts.down.weight.T] + ([parts.gate.weight] if parts.gate is not None else [])
    score = S.magnitude_scores(*[w.detach() for w in rows])
    idx = as_index(keep_lowest_removed(score, uniform_n_remove(adapter, layer, walk.budget, walk.cfg)))
    prune_mlp(adapter, layer, idx)
    return record(adapter, layer, kept_neurons=idx.tolist(), width=int(idx.numel())), None


register(Method("magnitude", step, plan_budget=plan_neurons_only,
                help="MLP neurons by their weights' L2 norm, data-free"))
