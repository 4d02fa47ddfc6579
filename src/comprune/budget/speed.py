"""A budget in llama.cpp generation speed, planned from a latency table (comprune.export.latency measures it):
the ratio whose plan is predicted to reach a speedup, and the whole blocks the width search must remove to
reach one at a fixed ratio. Pure functions of the model's shapes, the configuration (read only) and the table."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import CompruneError
from .plan import kept_width, params_per_neuron, plan_budget


def predicted_speedup(table: dict, layer_fraction: float, neuron_fraction: float) -> float:
    """llama.cpp generation speedup (dense time / pruned time) of a model keeping these fractions of its blocks
    and of its MLP neurons, from a latency table's fitted time = c + a * layers + m * neurons."""
    t = table["c"] + table["a"] * layer_fraction + table["m"] * neuron_fraction
    return 1.0 / max(t, 1e-9)


def plan_speedup(model, adapter, cfg, table: dict, ratio: float | None = None) -> float:
    """Predicted speedup of the plan `ratio` (default cfg.ratio) makes for this model."""
    b = plan_budget(model, adapter, cfg, ratio=ratio)
    layers = adapter.layers(model)
    L, kept = len(layers), len(layers) - b.layers_to_remove
    W = max(adapter.mlp(layer).down.in_features for layer in layers)
    w = kept_width(W, b.neurons_per_layer, cfg.round_to, cfg.min_width)  # the width the prune keeps
    return predicted_speedup(table, kept / L, kept * w / (L * W))


def ratio_for_speedup(model, adapter, cfg, table: dict, target: float, tol: float = 1e-4) -> dict:
    """The smallest ratio whose plan is predicted to reach `target` (bisection: the speedup grows with it)."""
    if target <= 1:
        raise CompruneError(f"--target-speedup {target} must be above 1 (e.g. 1.3)")

    def speed(r):
        try:
            return plan_speedup(model, adapter, cfg, table, ratio=r)
        except CompruneError:
            return None  # the plan cannot be made at this ratio (too many neurons per layer)
    lo, hi = 0.0, 0.9
    top = speed(hi)
    while top is None and hi > 0.05:
        hi -= 0.05
        top = speed(hi)
    if top is None or top < target:
        raise CompruneError(f"--target-speedup {target} is beyond what this model's plans reach on this machine "
                            f"(at most {top or 1:.2f}x predicted at ratio {hi:.2f}): ask for less, or raise "
                            "--layer-share (whole blocks save more time per parameter)")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        s = speed(mid)
        if s is not None and s >= target:
            hi = mid
        else:
            lo = mid
    return {"target": target, "ratio": hi, "predicted": speed(hi), "table": {k: table[k] for k in
            ("c", "a", "m", "qtype", "threads", "cpu", "points")}}


@dataclass
class BlockTerms:
    """The terms of the width search's budget a speed constraint needs: the kept blocks, the neurons the uniform
    plan removes from them (`exact`), a whole block's parameters counted in neurons of its MLP (attention and
    norms included), and the blocks the search may remove whole."""
    kept: list[int]
    exact: int
    block_neurons: float
    removable: tuple


def block_terms(model, adapter, removed: list[int], n_remove: int, cfg) -> BlockTerms:
    layers = adapter.layers(model)
    kept = [i for i in range(len(layers)) if i not in set(removed)]
    widths = [adapter.mlp(layers[i]).down.in_features for i in kept]
    exact = sum(w - kept_width(w, n_remove, cfg.round_to, cfg.min_width) for w in widths)
    block_neurons = sum(p.numel() for p in layers[kept[0]].parameters()) / params_per_neuron(adapter, layers[kept[0]])
    removable = tuple(i for i in kept if cfg.protect_first <= i < len(layers) - cfg.protect_last)
    return BlockTerms(kept, exact, block_neurons, removable)


def blocks_for_speedup(plan, n_layers: int, width: int, cfg) -> tuple[int, dict]:
    """The fewest whole blocks the search must remove for the latency table (cfg.latency) to predict
    cfg.search_speedup at this parameter budget. `plan` has the BlockTerms fields. The budget is exact, so the
    kept MLP neurons follow from the number of blocks removed (each costs `block_neurons` of it) and only that
    number moves the prediction."""
    k_max = min(len(plan.removable), int(plan.exact // max(plan.block_neurons, 1)))
    best = None
    for k in range(k_max + 1):
        neurons = (len(plan.kept) - k) * width - (plan.exact - k * plan.block_neurons)
        pred = predicted_speedup(cfg.latency, (len(plan.kept) - k) / n_layers, neurons / (n_layers * width))
        best = max(best or pred, pred)
        if pred >= cfg.search_speedup:
            return k, {"target": cfg.search_speedup, "min_removed_blocks": k, "predicted_at_minimum": pred}
    raise CompruneError(f"--target-speedup {cfg.search_speedup} is beyond this ratio's reach on this machine "
                        f"(at most {best:.2f}x predicted, removing {k_max} whole blocks): raise --ratio or ask for "
                        "less speed")


def speedup_blocks(model, adapter, cfg) -> tuple[int, float]:
    """(whole blocks, predicted speedup) the width search needs for cfg.search_speedup at cfg.ratio (checked
    before any pruning, on the model's shapes: an unreachable target is refused at once)."""
    b = plan_budget(model, adapter, cfg)
    removed = list(range(cfg.protect_first, cfg.protect_first + b.layers_to_remove))  # only their number matters
    terms = block_terms(model, adapter, removed, b.neurons_per_layer, cfg)
    layers = adapter.layers(model)
    width = max(adapter.mlp(layers[i]).down.in_features for i in terms.kept)
    k, record = blocks_for_speedup(terms, len(layers), width, cfg)
    return k, record["predicted_at_minimum"]


def settled(record: dict | None, details: dict) -> dict | None:
    """A target's record with what the prune decided: with a ratio, the speedup the search's allocation is
    predicted to reach (`details`: the method's, as in pruning.json)."""
    if not record or not record.get("with_ratio"):
        return record
    predicted = details.get("search", {}).get("speedup", {}).get("predicted", record["predicted_at_minimum"])
    return {**record, "predicted": predicted}
