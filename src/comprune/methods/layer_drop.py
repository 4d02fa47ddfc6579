"""layer-drop (ShortGPT): remove the k lowest block-influence blocks, nothing else."""
from __future__ import annotations

from ..registry import Method, register
from ..sequential import walk_blocks
from .baseline_parts import record
from ..budget.plan import plan_layers_only
from .common import choose_layers, layer_scores_bi


def run(walk, acts) -> dict:
    cfg, budget = walk.cfg, walk.budget

    def plan(acts):
        scores = layer_scores_bi(walk.model, walk.adapter, acts, walk.device, walk.show)
        return {"removed_layers": choose_layers(scores, budget.layers_to_remove, cfg.protect_first,
                                                cfg.protect_last), "layer_scores": scores}, None

    the_plan, blocks, _ = walk_blocks(walk, acts, lambda i, layer, a, p, c: (record(walk.adapter, layer), a), plan,
                                      "layer-drop")
    return {"removed_layers": the_plan["removed_layers"], "layer_scores": the_plan["layer_scores"], "blocks": blocks,
            "ratio_note": "layer-drop removes whole blocks: the ratio is reached to within one block"}


register(Method("layer-drop", run, help="ShortGPT: the lowest block-influence blocks, nothing else",
                plan_budget=plan_layers_only, resumable=True))
