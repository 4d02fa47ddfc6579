"""layer-drop (ShortGPT): remove the k lowest block-influence blocks, nothing else."""
from __future__ import annotations

from ..budget.plan import plan_layers_only
from ..registry import Method, register
from .baseline_parts import record
from .common import choose_layers, layer_scores_bi


def plan(walk, acts):
    cfg = walk.cfg
    scores = layer_scores_bi(walk, acts)
    return {"removed_layers": choose_layers(scores, walk.budget.layers_to_remove, cfg.protect_first,
                                            cfg.protect_last), "layer_scores": scores}, None


def step(walk, i, layer, acts, plan, carry):
    return record(walk.adapter, layer), acts


def details(walk, plan, records) -> dict:
    return {"removed_layers": plan["removed_layers"], "layer_scores": plan["layer_scores"], "blocks": records,
            "ratio_note": "layer-drop removes whole blocks: the ratio is reached to within one block"}


register(Method("layer-drop", step, plan=plan, details=details, plan_budget=plan_layers_only,
                help="ShortGPT: the lowest block-influence blocks, nothing else"))
