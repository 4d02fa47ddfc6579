"""Widths chosen against the whole model's output (width_allocation="search"; EvoPress, DarwinLM, Týr).

1. database: every kept block's MLP pruned at a ladder of levels (level l removes l·step neurons) on the dense
   inputs of the layer-pruned model, by the same structured OBS and least-squares refit the walk uses. Greedy OBS
   is nested, so one run to the deepest level gives every level's kept set; each level gets its own refit.
2. fitness: KL(dense ‖ stitched) of the next-token distributions on windows held apart from the calibration, the
   stitched model being the layer-pruned model with each block's MLP replaced by its variant. The dense
   log-probabilities are computed once (float16).
3. allocation: dynamic programming over every block's measured error curve (the KL with that block alone at each
   level), then an evolutionary search from it: level-shift mutations keep the budget exact, offspring are
   filtered on a few windows, and the best few are ranked on all of them. Deterministic for a seed and a number
   of generations; a wall-clock limit may stop it earlier; resumable from its state file.
The walk then prunes every block with its searched count on the already-pruned prefix, as always.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import compensate as LS
from ..errors import CompruneError
from ..evaluate.perplexity import family_logits
from ..walk import Activations, capture, collect_stats, forward_block, progress, resident
from .common import kept_width


@dataclass
class Ladder:
    step: int    # neurons per level
    top: int     # highest level


def make_ladder(width: int, cfg) -> Ladder:
    q = max(1, cfg.round_to)
    step = max(q, int(round(width / cfg.search_levels / q)) * q)
    top = min(int(cfg.search_max_share * width + 1e-9), width - max(cfg.min_width, 1)) // step
    return Ladder(step, top)


class Database:
    """The block variants on disk, one safetensors file per block (levels 1..top: kept neuron indices and the
    refitted down_proj weight; level 0 is the dense block). Memory holds one variant at a time, so the
    database may be larger than RAM; a killed build resumes at the first block without a file."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, block: int) -> Path:
        return self.root / f"block{block}.safetensors"

    def has(self, block: int) -> bool:
        return self.path(block).is_file()

    def save(self, block: int, variants: list[tuple[torch.Tensor, torch.Tensor]]):
        tensors = {}
        for level, (idx, w) in enumerate(variants, start=1):
            tensors[f"idx{level}"], tensors[f"w{level}"] = idx.contiguous(), w.contiguous()
        tmp = self.path(block).with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self.path(block))  # a kill leaves no half-written block

    def variant(self, block: int, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(str(self.path(block)), framework="pt") as f:
            return f.get_tensor(f"idx{level}"), f.get_tensor(f"w{level}")


@torch.inference_mode()
def build_database(model, adapter, acts, kept: list[int], ladder: Ladder, cfg, db: Database, show=True) -> Database:
    """Every kept block's variants at levels 1..top into `db` (blocks already there are kept). `acts` is
    consumed."""
    layers = adapter.layers(model)
    for i in progress(kept, "COMP search: variants", show):
        layer = layers[i]
        with resident(layer, cfg.device):
            if db.has(i):  # built by an interrupted run: only carry the activations on
                acts = forward_block(layer, acts, consume=True)
                continue
            down = adapter.mlp(layer).down
            own = LS.BlockStats(down, cfg.token_weight)
            hooks = own.attach(layer)
            try:
                _, acts = collect_stats(layer, acts, {"down": down}, consume=True)
            finally:
                for h in hooks:
                    h.remove()
            G, W = own.G, down.weight.detach()
            C = LS.dense_cross(G, W)
            order: list[int] = []
            LS.obs_select(G, C, ladder.top * ladder.step, cfg.damp, cfg.chunk, order=order)
            variants = []
            for level in range(1, ladder.top + 1):
                keep = torch.ones(W.shape[1], dtype=torch.bool)
                keep[torch.tensor(order[:level * ladder.step], dtype=torch.long)] = False
                idx = keep.nonzero().flatten()
                variants.append((idx, LS.refit(G, C, idx.to(G.device), cfg.damp).float().cpu()))
            db.save(i, variants)
            del G, C, variants
    return db


class Fitness:
    """KL(dense ‖ stitched) per token on held-apart windows, from block-0 inputs kept in memory."""

    def __init__(self, model, adapter, removed: list[int], db: dict, fit_ids: torch.Tensor, cfg):
        self.adapter, self.cfg, self.db = adapter, cfg, db
        self.layers = adapter.layers(model)
        self.norm, self.head = adapter.head(model)
        self.logit_fn = family_logits(model) or (lambda x: x)
        self.kept = [i for i in range(len(self.layers)) if i not in set(removed)]
        self.x0 = capture(model, adapter, fit_ids, cfg.batch_size, cfg.device)
        self.nbatches = len(self.x0.hidden)
        self.ref = [self._logprobs(h).half() for h in self._run(self.x0, range(len(self.layers))).hidden]
        # Single windows for the cheap stages (error curves, offspring filter): the LM head over the vocabulary
        # costs as much as a third of the blocks, so those stages read few tokens.
        self.windows = [(b, j) for b in range(self.nbatches) for j in range(self.x0.hidden[b].shape[0])]
        self.evaluations = 0

    def _logprobs(self, h: torch.Tensor) -> torch.Tensor:
        with resident(self.norm, self.cfg.device), resident(self.head, self.cfg.device):
            return torch.log_softmax(self.logit_fn(self.head(self.norm(h)).float()), -1)

    def _run(self, acts, blocks, levels=None) -> Activations:
        for i in blocks:
            with resident(self.layers[i], self.cfg.device):
                if levels is None or levels[i] == 0:
                    acts = forward_block(self.layers[i], acts)
                    continue
                down = self.adapter.mlp(self.layers[i]).down
                idx, Wl = self.db.variant(i, levels[i])
                full = torch.zeros_like(down.weight)
                full[:, idx.to(full.device)] = Wl.to(full)
                dense, down.weight.data = down.weight.data, full  # zero columns = the pruned neurons
                try:
                    acts = forward_block(self.layers[i], acts)
                finally:
                    down.weight.data = dense
        return acts

    def subset(self, windows=None) -> tuple[Activations, list[torch.Tensor]]:
        """Block-0 inputs and reference log-probabilities of some windows ((batch, row) pairs), or of all, as
        batches of the same shapes."""
        if windows is None:
            return self.x0, self.ref
        hidden, kwargs, ref = [], [], []
        for b, j in windows:
            hidden.append(self.x0.hidden[b][j:j + 1])
            kwargs.append(_row_kwargs(self.x0.kwargs[b], j, self.x0.hidden[b].shape[0]))
            ref.append(self.ref[b][j:j + 1])
        return Activations(hidden, kwargs), ref

    @torch.inference_mode()
    def __call__(self, levels: dict, windows=None, start: int | None = None, acts: Activations | None = None) -> float:
        """Mean per-token KL of the stitched model at `levels` on `windows` (all by default). With `start` and
        `acts` (the inputs of block `start` for those windows), only the blocks from `start` on run."""
        x0, refs = self.subset(windows)
        acts = x0 if acts is None else acts
        blocks = [i for i in self.kept if start is None or i >= start]
        out = self._run(acts, blocks, levels)
        total, count = 0.0, 0
        for ref, h in zip(refs, out.hidden):
            ref = ref.float()
            total += float((ref.exp() * (ref - self._logprobs(h))).sum())
            count += ref.shape[0] * ref.shape[1]
        self.evaluations += 1
        return total / max(count, 1)

    def block_inputs(self, windows) -> dict[int, Activations]:
        """Dense (layer-pruned) inputs of every kept block on `windows`."""
        acts, _ = self.subset(windows)
        out = {}
        for i in self.kept:
            out[i] = acts
            acts = self._run(acts, [i])
        return out


def _row_kwargs(kwargs: dict, j: int, rows: int) -> dict:
    """A block's kwargs for row j of its batch: per-row tensors (masks, positions) sliced, shared ones kept."""
    def pick(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == rows and rows > 1:  # not cache_position
            return v[j:j + 1]
        if isinstance(v, tuple):
            return tuple(pick(x) for x in v)
        return v
    return {k: pick(v) for k, v in kwargs.items()}


def dp_allocate(costs: dict[int, list[float]], total: int) -> dict[int, int]:
    """Levels minimising Σ costs[i][l_i] subject to Σ l_i = total (exact, by dynamic programming)."""
    blocks = sorted(costs)
    INF = float("inf")
    best = [0.0] + [INF] * total  # best[t]: least cost of the blocks so far at t levels in all
    choice = []
    for i in blocks:
        new, pick = [INF] * (total + 1), [0] * (total + 1)
        for t in range(total + 1):
            if best[t] == INF:
                continue
            for lv, c in enumerate(costs[i]):
                if t + lv <= total and best[t] + c < new[t + lv]:
                    new[t + lv], pick[t + lv] = best[t] + c, lv
        best = new
        choice.append(pick)
    if best[total] == INF:
        raise ValueError(f"no allocation of {total} levels fits the ladders")
    levels, t = {}, total
    for i, pick in zip(reversed(blocks), reversed(choice)):
        levels[i] = pick[t]
        t -= pick[t]
    return dict(sorted(levels.items()))


def mutate(levels: dict, top: int, rng: random.Random, n: int) -> dict:
    """n level shifts: one block gives a level to another, so the total (the budget) never changes."""
    child = dict(levels)
    blocks = sorted(child)
    for _ in range(n):
        donors = [i for i in blocks if child[i] > 0]
        takers = [i for i in blocks if child[i] < top]
        if not donors or not takers:
            break
        a, b = rng.choice(donors), rng.choice(takers)
        if a != b:
            child[a] -= 1
            child[b] += 1
    return child


def evolve(fitness: Fitness, start: dict, top: int, cfg, state_file: Path | None = None, show=True) -> tuple[dict, list]:
    """(1 + λ) evolution from `start`; every generation's randomness comes from (seed, generation), so a resumed
    search continues exactly where the killed one stopped."""
    state = json.loads(state_file.read_text()) if state_file is not None and state_file.exists() else None
    if state is not None:
        parent = {int(k): v for k, v in state["parent"].items()}
        parent_fit, trace, gen0 = state["fitness"], state["trace"], state["generation"]
    else:
        parent, gen0 = dict(start), 0
        parent_fit = fitness(parent)
        trace = [[0, parent_fit]]
    deadline = time.monotonic() + cfg.search_time if cfg.search_time > 0 else float("inf")
    gens = range(gen0, cfg.search_generations)
    for gen in progress(gens, "COMP search: evolution", show, total=len(gens)):
        if time.monotonic() > deadline:
            break
        rng = random.Random(f"{cfg.seed}:{gen}")
        kids = [mutate(parent, top, rng, rng.randint(1, 3)) for _ in range(cfg.search_offspring)]
        kids = [k for k in kids if k != parent] or kids
        n = len(fitness.windows)
        few = [fitness.windows[(gen * cfg.search_filter + k) % n] for k in range(cfg.search_filter)]  # stage 1
        ranked = sorted(kids, key=lambda k: fitness(k, few))[: cfg.search_survivors]
        scored = [(fitness(k), k) for k in ranked]  # stage 2: every fitness window
        fit, kid = min(scored, key=lambda s: s[0])
        if fit < parent_fit:
            parent, parent_fit = kid, fit
        trace.append([gen + 1, parent_fit])
        if state_file is not None:
            tmp = state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"parent": parent, "fitness": parent_fit, "trace": trace,
                                       "generation": gen + 1}))
            os.replace(tmp, state_file)
    return parent, trace


def search_allocation(model, adapter, acts, removed: list[int], n_remove: int, cfg, fit_ids: torch.Tensor,
                      show=True, state_dir=None) -> tuple[list[int], dict]:
    """Neurons to remove per block (0 for removed blocks), summing to what the uniform plan removes, and the
    search's record for pruning.json. `acts` (block-0 calibration inputs) is consumed."""
    t0 = time.perf_counter()
    layers = adapter.layers(model)
    kept = [i for i in range(len(layers)) if i not in set(removed)]
    widths = {i: adapter.mlp(layers[i]).down.in_features for i in kept}
    ladder = make_ladder(min(widths.values()), cfg)
    exact = sum(w - kept_width(w, n_remove, cfg.round_to, cfg.min_width) for w in widths.values())
    total, rest = divmod(exact, ladder.step)
    if total > ladder.top * len(kept):
        raise CompruneError(f"the budget needs {total} levels of {ladder.step} neurons but the search's ladder "
                            f"holds {ladder.top} per block: raise --layer-share or lower --ratio")
    with tempfile.TemporaryDirectory(prefix="comprune-search-db-") as tmp:
        # with a checkpoint the database lives beside it (a resumed run keeps the blocks already built)
        db = Database(Path(state_dir) / "search-db" if state_dir is not None else tmp)
        build_database(model, adapter, acts, kept, ladder, cfg, db, show)
        return _search(model, adapter, removed, kept, layers, ladder, total, rest, db, fit_ids, cfg, show,
                       state_dir, t0)


def _search(model, adapter, removed, kept, layers, ladder, total, rest, db, fit_ids, cfg, show, state_dir, t0):
    fitness = Fitness(model, adapter, removed, db, fit_ids, cfg)
    few = fitness.windows[: cfg.search_filter]
    inputs = fitness.block_inputs(few)
    costs = {}
    for i in progress(kept, "COMP search: error curves", show):
        costs[i] = [0.0] + [fitness({**{j: 0 for j in kept}, i: lv}, few, start=i, acts=inputs[i])
                            for lv in range(1, ladder.top + 1)]
    del inputs
    levels = dp_allocate(costs, total)
    dp_fit = fitness(levels)
    state_file = Path(state_dir) / "search.json" if state_dir is not None else None
    levels, trace = evolve(fitness, levels, ladder.top, cfg, state_file, show) if cfg.search_generations else \
        (levels, [[0, dp_fit]])
    counts = [0] * len(layers)
    for i in kept:
        counts[i] = levels[i] * ladder.step
    if rest:  # the remainder below one level goes where the next level costs least
        cand = [i for i in kept if levels[i] < ladder.top]
        j = min(cand, key=lambda i: costs[i][levels[i] + 1] - costs[i][levels[i]])
        counts[j] += rest
    record = {"step": ladder.step, "top_level": ladder.top, "levels": {str(i): levels[i] for i in kept},
              "dp_fitness": dp_fit, "fitness": trace[-1][1], "trace": trace, "error_curves": {str(i): c for i, c in costs.items()},
              "fitness_tokens": int(fit_ids.numel()), "evaluations": fitness.evaluations,
              "seconds": round(time.perf_counter() - t0, 1)}
    return counts, record
