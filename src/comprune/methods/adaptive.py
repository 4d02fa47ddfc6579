"""COMP's adaptive widths: neurons removed per block from one global ranking of normalised scores."""
from __future__ import annotations

import math

import torch

from .. import distributed, scores as S
from ..errors import CompruneError
from ..sequential import walk_blocks
from ..walk import collect_stats
from .neurons import one_shot_scores


@torch.inference_mode()
def allocate_widths(walk, acts, removed: list[int], neurons_per_layer: int) -> list[int]:
    """Neurons to remove per block (0 for removed blocks) from a global ranking across blocks, instead of the
    same number everywhere (`width_allocation="adaptive"`).

    One dense pass over the kept blocks (fed through kept blocks only, as the walk will be) scores every
    neuron by COMP's condition score - the squared output error of removing it after the best re-weighting of
    the rest - normalised by the block's output energy (sum over tokens of ||h_out||^2), so a score is the
    relative change of the residual stream that neuron's removal causes. The lowest normalised scores across
    all blocks go, as many as the uniform plan removes in total (the same parameter budget); every block keeps
    at least a quarter of its width (and cfg.min_width). The greedy per-block selection then runs as usual
    with each block's own count, on the already-pruned upstream inputs. `acts` is consumed."""
    adapter, cfg, layers = walk.adapter, walk.cfg, walk.layers
    kept = [i for i in range(len(layers)) if i not in set(removed)]
    norm = cfg.allocation_norm  # "output" (residual stream) or "mlp"
    # ablation knob: "condition" (COMP's score, normalised as above) or "fluctuation" (FLAP's ranking: the
    # fluctuation Var(X_j)·‖W_:,j‖², standardised within each MLP, so no energy normalisation is needed)
    how = cfg.allocation_score
    candidates = []  # (normalised score, block) of the neurons each block may lose
    def score_block(walk, i, layer, acts, plan, carry):
        parts = adapter.mlp(layer)
        gram = set() if how == "fluctuation" else {"down"}  # the fluctuation needs no Gram
        stats, acts = collect_stats(layer, acts, {"down": parts.down}, gram=gram, consume=True)
        if how == "fluctuation":
            score = S.flap_channel_scores(parts.down.weight.detach(), stats["down"].var())
        else:
            G = stats["down"].gram
            if norm == "mlp":  # the MLP's own output energy tr(W G W^T): scores become relative MLP errors
                W = parts.down.weight.detach().double().to(G.device)
                energy = float(((W @ G) * W).sum())
            else:  # the block's output (residual stream) energy
                energy = distributed.sum_floats(sum(float(y.double().pow(2).sum()) for y in acts.hidden))[0]
            score = one_shot_scores("condition", G, parts, cfg) / max(energy, 1e-30)
            del G
        del stats
        width = score.numel()
        floor = max(cfg.min_width, math.ceil(width / 4))
        lowest = torch.sort(score.cpu()).values[: max(width - floor, 0)]
        candidates.extend((v, i) for v in lowest.tolist())
        return None, acts

    walk_blocks(walk.without_checkpoint(), acts, score_block, lambda w, a: ({"removed_layers": removed}, a),
                "COMP width allocation")
    total = neurons_per_layer * len(kept)
    if total > len(candidates):
        raise CompruneError(f"the neuron budget ({total}) exceeds what adaptive allocation may take while every "
                            "block keeps a quarter of its MLP: use the uniform allocation or raise --layer-share")
    counts = [0] * len(layers)
    for _, i in sorted(candidates)[:total]:
        counts[i] += 1
    return counts
