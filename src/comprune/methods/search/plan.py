"""The search's budget and its run: how many ladder levels the kept blocks share (whole blocks and the speed
budget included), the database, error curves, allocation and evolution in order, and the neurons per block that
the walk then prunes, corrected to the budget exactly.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


from ... import distributed
from ...errors import CompruneError
from ...walk import progress
from ...budget.plan import kept_width, params_per_neuron
from ...budget.speed import blocks_for_speedup, predicted_speedup
from .database import Database, Ladder, build_database, make_ladder
from .fitness import Fitness
from .optimiser import dp_allocate, evolve


@dataclass
class Plan:
    """What the search allocates: `total` levels of `ladder.step` neurons over the kept blocks (`exact` neurons
    in all); with search_layers, level `removed_level` removes a `removable` block, worth `block_neurons`."""
    kept: list[int]
    ladder: Ladder
    total: int
    exact: int
    block_neurons: float = 0.0
    removed_level: int | None = None
    removable: tuple = ()
    min_removed: int = 0         # whole blocks the speed budget needs (search_speedup)
    speedup: dict | None = None  # the speed budget's record


def make_plan(model, adapter, removed: list[int], n_remove: int, cfg) -> Plan:
    """The search's budget in ladder levels for these removed blocks and `n_remove` neurons a block (the uniform
    plan's), with whole-block removal and the speed budget's minimum when the config asks for them."""
    layers = adapter.layers(model)
    kept = [i for i in range(len(layers)) if i not in set(removed)]
    widths = {i: adapter.mlp(layers[i]).down.in_features for i in kept}
    ladder = make_ladder(min(widths.values()), cfg)
    exact = sum(w - kept_width(w, n_remove, cfg.round_to, cfg.min_width) for w in widths.values())
    plan = Plan(kept, ladder, exact // ladder.step, exact)
    if cfg.search_layers or cfg.search_speedup:
        # a whole block costs its parameters, counted in neurons of its MLP (attention and norms included)
        plan.block_neurons = sum(p.numel() for p in layers[kept[0]].parameters()) / \
            params_per_neuron(adapter, layers[kept[0]])
        plan.removed_level = max(ladder.top + 1, int(round(plan.block_neurons / ladder.step)))
        plan.removable = tuple(i for i in kept if cfg.protect_first <= i < len(layers) - cfg.protect_last)
    if cfg.search_speedup:
        plan.min_removed, plan.speedup = blocks_for_speedup(plan, len(layers), max(widths.values()), cfg)
    return plan


def search_allocation(walk, acts, removed: list[int], n_remove: int) -> tuple[list[int], dict]:
    """Neurons to remove per block (0 for removed blocks), summing to what the uniform plan removes, and the
    search's record for pruning.json (with search_layers, `removed_blocks`: blocks the search removes whole).
    `acts` (block-0 calibration inputs) is consumed; the database and state live beside the walk's checkpoint."""
    model, adapter, cfg, show = walk.model, walk.adapter, walk.cfg, walk.show
    state_dir = walk.checkpoint.dir if walk.checkpoint is not None else None
    t0 = time.perf_counter()
    layers = adapter.layers(model)
    plan = make_plan(model, adapter, removed, n_remove, cfg)
    kept, ladder = plan.kept, plan.ladder
    if plan.total > ladder.top * len(kept) and not plan.removable:
        raise CompruneError(f"the budget needs {plan.total} levels of {ladder.step} neurons but the search's "
                            f"ladder holds {ladder.top} per block: raise --layer-share or lower --ratio")
    with tempfile.TemporaryDirectory(prefix="comprune-search-db-") as tmp:
        # with a checkpoint the database lives beside it (a resumed run keeps the blocks already built); the other
        # ranks of a group build theirs from the same summed statistics, in their own temporary directory
        db = Database(Path(state_dir) / "search-db" if state_dir is not None and distributed.is_writer() else tmp)
        build_database(model, adapter, acts, kept, ladder, cfg, db, show, walk.hold)
        return _search(walk, removed, layers, plan, db, state_dir, t0)


def _search(walk, removed, layers, plan: Plan, db, state_dir, t0):
    model, adapter, cfg, fit_ids, show = walk.model, walk.adapter, walk.cfg, walk.fitness_ids, walk.show
    kept, ladder, R = plan.kept, plan.ladder, plan.removed_level
    fitness = Fitness(model, adapter, removed, db, fit_ids, cfg, walk)
    fitness.removed_level = R
    few = fitness.windows[: cfg.search_filter]
    inputs = fitness.block_inputs(few)
    costs = {}
    for i in progress(kept, "COMP search: error curves", show):
        costs[i] = [0.0] + fitness.curve(i, range(1, ladder.top + 1), few, inputs[i])
        if i in plan.removable:  # unreachable levels up to the removal's
            costs[i] += [float("inf")] * (R - ladder.top - 1) + fitness.curve(i, [R], few, inputs[i])
    del inputs
    try:
        levels = dp_allocate(costs, plan.total, R, plan.min_removed)
    except ValueError:
        raise CompruneError(f"no allocation of the budget fits the search's ladders ({ladder.top} levels of "
                            f"{ladder.step} neurons a block): raise --layer-share or lower --ratio") from None
    dp_fit = fitness(levels)
    state_file = Path(state_dir) / "search.json" if state_dir is not None else None
    levels, trace = evolve(fitness, levels, ladder.top, cfg, state_file, show, plan.removable, plan.min_removed,
                           write=distributed.is_writer()) \
        if cfg.search_generations else (levels, [[0, dp_fit]])
    gone = [i for i in kept if levels[i] == R]
    counts = _neuron_counts(levels, gone, costs, plan, len(layers))
    record = {"step": ladder.step, "top_level": ladder.top, "levels": {str(i): levels[i] for i in kept},
              "dp_fitness": dp_fit, "fitness": trace[-1][1], "trace": trace, "error_curves": {str(i): c for i, c in costs.items()},
              "fitness_tokens": int(fit_ids.numel()), "evaluations": fitness.evaluations,
              "seconds": round(time.perf_counter() - t0, 1)}
    if R is not None:
        record.update(removed_level=R, removed_blocks=gone, block_neurons=plan.block_neurons)
    if plan.speedup is not None:
        W = max(adapter.mlp(layers[i]).down.in_features for i in kept)
        live = [i for i in kept if i not in gone]
        neurons = sum(adapter.mlp(layers[i]).down.in_features - counts[i] for i in live)
        record["speedup"] = {**plan.speedup, "predicted": predicted_speedup(
            cfg.latency, len(live) / len(layers), neurons / (len(layers) * W))}
    return counts, record


def _neuron_counts(levels: dict, gone: list[int], costs: dict, plan: Plan, n_layers: int) -> list[int]:
    """Neurons per block from the levels, corrected to the budget exactly: the part below one level (and, for
    blocks removed whole, the difference between their levels and their real size) goes to or comes back from
    the blocks where that costs least."""
    step, top = plan.ladder.step, plan.ladder.top
    live = [i for i in plan.kept if i not in gone]
    counts = [0] * n_layers
    for i in live:
        counts[i] = levels[i] * step
    diff = plan.exact - int(round(len(gone) * plan.block_neurons)) - sum(counts)
    while diff > 0:
        cand = [i for i in live if counts[i] < top * step]
        if not cand:
            break
        j = min(cand, key=lambda i: costs[i][min(top, levels[i] + 1)] - costs[i][levels[i]])
        add = min(diff, top * step - counts[j], step)
        counts[j] += add
        diff -= add
    while diff < 0:
        cand = [i for i in live if counts[i] > 0]
        if not cand:
            break
        j = max(cand, key=lambda i: costs[i][levels[i]] - costs[i][max(0, levels[i] - 1)])
        back = min(-diff, counts[j], step)
        counts[j] -= back
        diff += back
    return counts
