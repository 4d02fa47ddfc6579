"""The search's allocation of ladder levels to blocks: dynamic programming over every block's error curve, then
a (1 + λ) evolution from it whose level-shift mutations keep the budget exact. Deterministic for a seed and a
number of generations; a wall-clock limit may stop it earlier; resumable from its state file.

Plain Python on purpose (no torch, no comprune import): the fitness comes in as an object, so the search's
arithmetic is importable and testable on its own.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

from tqdm.auto import tqdm


def dp_allocate(costs: dict[int, list[float]], total: int, removed_level: int | None = None,
                min_removed: int = 0) -> dict[int, int]:
    """Levels minimising Σ costs[i][l_i] subject to Σ l_i = total (exact, by dynamic programming), and, with
    `min_removed`, at least that many blocks at `removed_level` (a speed budget: whole blocks save the most time
    per parameter)."""
    blocks = sorted(costs)
    INF = float("inf")
    R = min_removed if removed_level is not None else 0
    # best[r][t]: least cost of the blocks so far at t levels in all, min(R, blocks removed) = r
    best = [[0.0] + [INF] * total] + [[INF] * (total + 1) for _ in range(R)]
    choice = []
    for i in blocks:
        new = [[INF] * (total + 1) for _ in range(R + 1)]
        pick = [[(0, 0)] * (total + 1) for _ in range(R + 1)]
        for r in range(R + 1):
            for t in range(total + 1):
                if best[r][t] == INF:
                    continue
                for lv, c in enumerate(costs[i]):
                    r2 = min(R, r + (lv == removed_level))
                    if t + lv <= total and best[r][t] + c < new[r2][t + lv]:
                        new[r2][t + lv], pick[r2][t + lv] = best[r][t] + c, (lv, r)
        best = new
        choice.append(pick)
    if best[R][total] == INF:
        raise ValueError(f"no allocation of {total} levels fits the ladders")
    levels, t, r = {}, total, R
    for i, pick in zip(reversed(blocks), reversed(choice)):
        lv, r_prev = pick[r][t]
        levels[i] = lv
        t, r = t - lv, r_prev
    return dict(sorted(levels.items()))


def mutate(levels: dict, top: int, rng: random.Random, n: int, removed_level: int | None = None,
           removable=()) -> dict:
    """n level shifts: one block gives a level to another, so the total (the budget) never changes. With
    `removed_level`, a shift may instead remove a `removable` block (the levels it costs beyond its own taken
    from others) or bring a removed one back (its levels given to others)."""
    child = dict(levels)
    blocks = sorted(child)
    for _ in range(n):
        if removed_level is not None and rng.random() < 0.25:
            _toggle_block(child, top, rng, removed_level, removable)
            continue
        donors = [i for i in blocks if 0 < child[i] <= top]
        takers = [i for i in blocks if child[i] < top]
        if not donors or not takers:
            break
        a, b = rng.choice(donors), rng.choice(takers)
        if a != b:
            child[a] -= 1
            child[b] += 1
    return child


def _toggle_block(child: dict, top: int, rng: random.Random, removed: int, removable):
    """Remove one block or restore one, in place, keeping the total; nothing when the others cannot pay."""
    out = [i for i in removable if child[i] == removed]
    cand = [i for i in removable if child[i] != removed]
    if out and (not cand or rng.random() < 0.5):
        a, lv = rng.choice(out), rng.randint(0, top)
        takers = [i for i in child if i != a and child[i] < top]
        if sum(top - child[i] for i in takers) < removed - lv:
            return
        child[a] = lv
        for _ in range(removed - lv):
            b = rng.choice([i for i in takers if child[i] < top])
            child[b] += 1
    elif cand:
        a = rng.choice(cand)
        donors = [i for i in child if i != a and 0 < child[i] <= top]
        if sum(child[i] for i in donors) < removed - child[a]:
            return
        for _ in range(removed - child[a]):
            b = rng.choice([i for i in donors if child[i] > 0])
            child[b] -= 1
        child[a] = removed


# A resumed search compares with the very fitness the killed one had (inf and nan too), in strict JSON: the
# format of comprune.outputs.json_text(exact=True), written here because this module imports nothing of comprune.
def _exact(x):
    return {"$float": repr(x)} if isinstance(x, float) and not math.isfinite(x) else x


def _exact_float(d: dict):
    return float(d["$float"]) if len(d) == 1 and isinstance(d.get("$float"), str) else d


def evolve(fitness, start: dict, top: int, cfg, state_file: Path | None = None, show=True,
           removable=(), min_removed: int = 0, write: bool = True) -> tuple[dict, list]:
    """(1 + λ) evolution from `start`; every generation's randomness comes from (seed, generation), so a resumed
    search continues exactly where the killed one stopped. Offspring removing fewer than `min_removed` whole
    blocks (the speed budget) are not considered; write=False reads a state file without writing it (the other
    ranks of a process group, which take the same steps from the same summed fitness). `fitness` is what fitness.Fitness is to it: `population`,
    `windows` and `removed_level`."""
    state = json.loads(state_file.read_text(), object_hook=_exact_float) \
        if state_file is not None and state_file.exists() else None
    parent = {int(k): v for k, v in state["parent"].items()} if state is not None else dict(start)
    # the parent's trajectory: offspring run from where they leave it
    (parent_fit,), (traj,) = fitness.population([parent], record=True)
    if state is not None:
        parent_fit, trace, gen0 = state["fitness"], state["trace"], state["generation"]
    else:
        trace, gen0 = [[0, parent_fit]], 0
    deadline = time.monotonic() + cfg.search_time if cfg.search_time > 0 else float("inf")
    gens = range(gen0, cfg.search_generations)
    # walk.progress's bar, built here because walk imports torch
    bar = tqdm(gens, desc="COMP search: evolution", disable=not show, total=len(gens), dynamic_ncols=True, leave=False)
    for gen in bar:
        if time.monotonic() > deadline:
            break
        rng = random.Random(f"{cfg.seed}:{gen}")
        kids = [mutate(parent, top, rng, rng.randint(1, 3), fitness.removed_level, removable)
                for _ in range(cfg.search_offspring)]
        kids = [k for k in kids if k != parent] or kids
        if min_removed:
            kids = [k for k in kids if sum(v == fitness.removed_level for v in k.values()) >= min_removed]
            if not kids:  # every mutation broke the speed budget: the parent stays
                trace.append([gen + 1, parent_fit])
                continue
        n = len(fitness.windows)
        few = [fitness.windows[(gen * cfg.search_filter + k) % n] for k in range(cfg.search_filter)]  # stage 1
        filtered = fitness.population(kids, few, parent=(parent, traj))
        ranked = [kids[j] for j in sorted(range(len(kids)), key=filtered.__getitem__)[: cfg.search_survivors]]
        # stage 2, every fitness window: one kid per call, so a recorded trajectory is what a resume recomputes
        scored = [fitness.population([k], parent=(parent, traj), record=True) for k in ranked]
        fits = [fit for (fit,), _ in scored]
        j = min(range(len(ranked)), key=fits.__getitem__)
        if fits[j] < parent_fit:
            parent, parent_fit, traj = ranked[j], fits[j], scored[j][1][0]
        del scored  # the losers' trajectories
        trace.append([gen + 1, parent_fit])
        if state_file is not None and write:
            tmp = state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"parent": parent, "fitness": _exact(parent_fit),
                                       "trace": [[g, _exact(f)] for g, f in trace], "generation": gen + 1},
                                      allow_nan=False))
            os.replace(tmp, state_file)
    return parent, trace
