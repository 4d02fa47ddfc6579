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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CompruneError
from ..evaluate.perplexity import family_logits
from ..obs import obs_select
from ..refit import BlockStats, dense_cross, refit
from ..walk import Activations, capture, collect_stats, forward_block, progress, resident
from .common import kept_width, params_per_neuron, predicted_speedup


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
            own = BlockStats(down, cfg.token_weight, normed=adapter.output_norms)
            hooks = own.attach(layer)
            try:
                _, acts = collect_stats(layer, acts, {"down": down}, consume=True)
            finally:
                for h in hooks:
                    h.remove()
            G, W = own.G, down.weight.detach()
            C = dense_cross(G, W)
            order: list[int] = []
            obs_select(G, C, ladder.top * ladder.step, cfg.damp, cfg.chunk, order=order)
            variants = []
            for level in range(1, ladder.top + 1):
                keep = torch.ones(W.shape[1], dtype=torch.bool)
                keep[torch.tensor(order[:level * ladder.step], dtype=torch.long)] = False
                idx = keep.nonzero().flatten()
                variants.append((idx, refit(G, C, idx.to(G.device), cfg.damp).float().cpu()))
            db.save(i, variants)
            del G, C, variants
    return db


@contextmanager
def _narrowed(parts, idx: torch.Tensor, down_weight: torch.Tensor):
    """The MLP cut to neurons `idx`, its down_proj's kept columns refitted, while the context lasts: the
    stitched block runs only its kept neurons' products, as the physically pruned one will."""
    saved = []

    def swap(t: torch.Tensor, data: torch.Tensor):
        saved.append((t, t.data))
        t.data = data

    idx = idx.to(parts.down.weight.device)
    for lin in (parts.gate, parts.up):
        if lin is not None:
            swap(lin.weight, lin.weight.data[idx])
            if lin.bias is not None:
                swap(lin.bias, lin.bias.data[idx])
    swap(parts.down.weight, down_weight.to(parts.down.weight))
    try:
        yield
    finally:
        for t, data in reversed(saved):
            t.data = data


@dataclass
class _Moments:
    """The dense next-token distribution p at each token, as the KL against an affine head needs it (see
    Fitness._reference): Wᵀp / s [rows, T, d], Σ p log p − p · b / s and Σ p [rows, T]."""
    m: torch.Tensor
    const: torch.Tensor
    mass: torch.Tensor

    @property
    def shape(self):
        return self.mass.shape

    def __getitem__(self, rows):
        return _Moments(self.m[rows], self.const[rows], self.mass[rows])


class Fitness:
    """KL(dense ‖ stitched) per token on held-apart windows, from block-0 inputs kept in memory."""

    def __init__(self, model, adapter, removed: list[int], db: dict, fit_ids: torch.Tensor, cfg):
        self.adapter, self.cfg, self.db = adapter, cfg, db
        self.removed_level = None  # the level that removes a whole block (search_layers), above every ladder level
        self.layers = adapter.layers(model)
        self.norm, self.head = adapter.head(model)
        self.logit_fn = family_logits(model) or (lambda x: x)
        self.kept = [i for i in range(len(self.layers)) if i not in set(removed)]
        self.x0 = capture(model, adapter, fit_ids, cfg.batch_size, cfg.device)
        self.nbatches = len(self.x0.hidden)
        self.head_config = model.config
        self.linear_head = not getattr(model.config, "final_logit_softcapping", None)
        with torch.inference_mode():
            self.ref = [self._reference(h) for h in self._run(self.x0, range(len(self.layers))).hidden]
        # Single windows for the cheap stages (error curves, offspring filter): the LM head over the vocabulary
        # costs as much as a third of the blocks, so those stages read few tokens.
        self.windows = [(b, j) for b in range(self.nbatches) for j in range(self.x0.hidden[b].shape[0])]
        self.evaluations = 0

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        with resident(self.head, self.cfg.device):
            return self.logit_fn(self.head(x).float())

    def _normed(self, h: torch.Tensor) -> torch.Tensor:
        with resident(self.norm, self.cfg.device):
            return self.norm(h)

    def _reference(self, h: torch.Tensor):
        """What KL(p ‖ q) needs of the dense distribution p at every token. With logits affine in the final
        hidden state x (z = (W x + b) / s: no soft-cap), KL_t = Σ p log p − Σ p z(x') + lse z(x') · Σ p, and
        Σ p z(x') = x' · Wᵀp / s + p · b / s, so three small per-token tensors (Wᵀp / s, the constant, Σ p)
        stand for p, and a candidate costs one pass over its logits (their logsumexp). Otherwise p's
        log-probabilities, in float16."""
        x = self._normed(h)
        logp = torch.log_softmax(self._logits(x), -1)
        if not self.linear_head:
            return logp.half()
        prob = logp.exp()
        scale = 1.0 / float(getattr(self.head_config, "logits_scaling", None) or 1.0)
        with resident(self.head, self.cfg.device):
            W, b = self.head.weight, self.head.bias
            m = (prob @ W.to(prob.device).float()) * scale  # [rows, T, d]: the head's input dimension
            const = (prob * logp).sum(-1)
            if b is not None:
                const = const - (prob @ b.to(prob.device).float()) * scale
        return _Moments(m, const, prob.sum(-1))

    @torch.inference_mode()
    def _kl_sum(self, ref, h: torch.Tensor) -> float:
        """Σ over tokens of KL(dense ‖ stitched), from the dense reference and the stitched hidden states."""
        x = self._normed(h)
        z = self._logits(x)
        if isinstance(ref, _Moments):
            return float((ref.const - (x.float() * ref.m).sum(-1) + torch.logsumexp(z, -1) * ref.mass).double().sum())
        ref = ref.float()
        return float((ref.exp() * (ref - torch.log_softmax(z, -1))).sum())

    def _run(self, acts, blocks, levels=None) -> Activations:
        for i in blocks:
            with resident(self.layers[i], self.cfg.device):
                if levels is not None and levels[i] == self.removed_level:
                    continue  # the block is skipped: its inputs go on to the next
                if levels is None or levels[i] == 0:
                    acts = forward_block(self.layers[i], acts)
                    continue
                with _narrowed(self.adapter.mlp(self.layers[i]), *self.db.variant(i, levels[i])):
                    acts = forward_block(self.layers[i], acts)
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
            total += self._kl_sum(ref, h)
            count += ref.shape[0] * ref.shape[1]
        self.evaluations += 1
        return total / max(count, 1)

    @torch.inference_mode()
    def population(self, kids: list[dict], windows=None, parent: tuple | None = None, record: bool = False):
        """What __call__ gives each of `kids`, all in one pass. Kids whose levels agree on every block so far
        share one activation, and each block runs once per distinct level on the rows at that level, stacked as
        one batch. With `parent` = (levels, trajectory), a kid runs only from its first block that differs from
        the parent: before it, its activations are the parent's. Offspring differ from their parent in a few
        blocks, so most of the model runs once, or not at all.

        With record=True (all windows), also returns every kid's trajectory: its input of every kept block and
        its final hidden state, per batch. One kid alone runs the same operations on the same shapes as a
        search from scratch, so a trajectory recorded that way is bit for bit what a resumed search recomputes."""
        if record and windows is not None:
            raise ValueError("trajectories are recorded on every window")
        x0, refs = self.subset(windows)
        n = len(self.kept)
        levels0, traj0 = parent if parent is not None else (None, None)
        trajs = [[[None] * len(x0.hidden) for _ in range(n + 1)] for _ in kids] if record else None
        totals, count = [0.0] * len(kids), 0
        for b, (kw, ref) in enumerate(zip(x0.kwargs, refs)):
            rows = x0.hidden[b].shape[0]
            at_parent = lambda p: self._rows(traj0[p], windows, b)  # noqa: E731
            classes = [(list(range(len(kids))), None if parent is not None else x0.hidden[b])]  # None: the parent's
            for p, i in enumerate(self.kept):
                if record:
                    for members, h in classes:
                        for k in members:
                            trajs[k][p][b] = at_parent(p) if h is None else h
                split, todo = [], {}
                for members, h in classes:
                    by_level: dict[int, list[int]] = {}
                    for k in members:
                        by_level.setdefault(kids[k][i], []).append(k)
                    for lv, ks in by_level.items():
                        if h is None and lv == levels0[i]:
                            split.append((ks, None))
                            continue
                        todo.setdefault(lv, []).append(len(split))
                        split.append((ks, at_parent(p) if h is None else h))
                for lv, at in todo.items():
                    hs = [split[j][1] for j in at]
                    acts = Activations([torch.cat(hs) if len(hs) > 1 else hs[0]], [_repeat_kwargs(kw, rows, len(hs))])
                    for j, out in zip(at, self._run(acts, [i], {i: lv}).hidden[0].split(rows)):
                        split[j] = (split[j][0], out)
                classes = split
            for members, h in classes:
                h = at_parent(n) if h is None else h
                kl = self._kl_sum(ref, h)
                for k in members:
                    totals[k] += kl
                    if record:
                        trajs[k][n][b] = h
            count += ref.shape[0] * ref.shape[1]
        self.evaluations += len(kids)
        fits = [t / max(count, 1) for t in totals]
        return (fits, trajs) if record else fits

    def _rows(self, batches: list[torch.Tensor], windows, b: int) -> torch.Tensor:
        """Batch b of subset(windows), taken from a trajectory's per-batch tensors at one block."""
        if windows is None:
            return batches[b]
        bb, j = windows[b]
        return batches[bb][j:j + 1]

    @torch.inference_mode()
    def curve(self, i: int, levels, windows, acts: Activations) -> list[float]:
        """KL with block i alone at each of `levels` (every other block dense) on `windows`, from block i's
        inputs `acts`. Block i runs once per level; the blocks after it and the head run once on all levels
        stacked as one batch, which is several times faster than a one-window call per level on a CPU."""
        levels = list(levels)
        base = {j: 0 for j in self.kept}
        _, refs = self.subset(windows)
        variants = [self._run(acts, [i], {**base, i: lv}) for lv in levels]
        stacked = Activations([torch.cat([v.hidden[w] for v in variants]) for w in range(len(acts.hidden))],
                              [_repeat_kwargs(kw, 1, len(levels)) for kw in acts.kwargs])
        out = self._run(stacked, [j for j in self.kept if j > i])
        total, count = [0.0] * len(levels), 0
        for ref, h in zip(refs, out.hidden):
            for k, hk in enumerate(h.split(ref.shape[0])):  # one level's rows at a time: the head's output is big
                total[k] += self._kl_sum(ref, hk)
            count += ref.shape[0] * ref.shape[1]
        self.evaluations += len(levels)
        return [t / max(count, 1) for t in total]

    def block_inputs(self, windows) -> dict[int, Activations]:
        """Dense (layer-pruned) inputs of every kept block on `windows`."""
        acts, _ = self.subset(windows)
        out = {}
        for i in self.kept:
            out[i] = acts
            acts = self._run(acts, [i])
        return out


def _per_row(kwargs: dict, rows: int, fn) -> dict:
    """A block's kwargs with fn applied to its per-row tensors (masks, positions: batch dimension `rows`; not
    cache_position), tuples followed, shared values kept."""
    def go(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == rows:
            return fn(v)
        if isinstance(v, tuple):
            return tuple(go(x) for x in v)
        return v
    return {k: go(v) for k, v in kwargs.items()}


def _row_kwargs(kwargs: dict, j: int, rows: int) -> dict:
    """A block's kwargs for row j of its batch."""
    return _per_row(kwargs, rows, lambda v: v[j:j + 1]) if rows > 1 else kwargs


def _repeat_kwargs(kwargs: dict, rows: int, n: int) -> dict:
    """A `rows`-row batch's kwargs for n copies of its rows stacked one after another."""
    return _per_row(kwargs, rows, lambda v: v.repeat(n, *[1] * (v.dim() - 1))) if n > 1 else kwargs


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


def evolve(fitness: Fitness, start: dict, top: int, cfg, state_file: Path | None = None, show=True,
           removable=(), min_removed: int = 0) -> tuple[dict, list]:
    """(1 + λ) evolution from `start`; every generation's randomness comes from (seed, generation), so a resumed
    search continues exactly where the killed one stopped. Offspring removing fewer than `min_removed` whole
    blocks (the speed budget) are not considered."""
    state = json.loads(state_file.read_text()) if state_file is not None and state_file.exists() else None
    parent = {int(k): v for k, v in state["parent"].items()} if state is not None else dict(start)
    # the parent's trajectory: offspring run from where they leave it
    (parent_fit,), (traj,) = fitness.population([parent], record=True)
    if state is not None:
        parent_fit, trace, gen0 = state["fitness"], state["trace"], state["generation"]
    else:
        trace, gen0 = [[0, parent_fit]], 0
    deadline = time.monotonic() + cfg.search_time if cfg.search_time > 0 else float("inf")
    gens = range(gen0, cfg.search_generations)
    for gen in progress(gens, "COMP search: evolution", show, total=len(gens)):
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
        if state_file is not None:
            tmp = state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"parent": parent, "fitness": parent_fit, "trace": trace,
                                       "generation": gen + 1}))
            os.replace(tmp, state_file)
    return parent, trace


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


def search_allocation(model, adapter, acts, removed: list[int], n_remove: int, cfg, fit_ids: torch.Tensor,
                      show=True, state_dir=None) -> tuple[list[int], dict]:
    """Neurons to remove per block (0 for removed blocks), summing to what the uniform plan removes, and the
    search's record for pruning.json (with search_layers, `removed_blocks`: blocks the search removes whole).
    `acts` (block-0 calibration inputs) is consumed."""
    t0 = time.perf_counter()
    layers = adapter.layers(model)
    plan = make_plan(model, adapter, removed, n_remove, cfg)
    kept, ladder = plan.kept, plan.ladder
    if plan.total > ladder.top * len(kept) and not plan.removable:
        raise CompruneError(f"the budget needs {plan.total} levels of {ladder.step} neurons but the search's "
                            f"ladder holds {ladder.top} per block: raise --layer-share or lower --ratio")
    with tempfile.TemporaryDirectory(prefix="comprune-search-db-") as tmp:
        # with a checkpoint the database lives beside it (a resumed run keeps the blocks already built)
        db = Database(Path(state_dir) / "search-db" if state_dir is not None else tmp)
        build_database(model, adapter, acts, kept, ladder, cfg, db, show)
        return _search(model, adapter, removed, layers, plan, db, fit_ids, cfg, show, state_dir, t0)


def _search(model, adapter, removed, layers, plan: Plan, db, fit_ids, cfg, show, state_dir, t0):
    kept, ladder, R = plan.kept, plan.ladder, plan.removed_level
    fitness = Fitness(model, adapter, removed, db, fit_ids, cfg)
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
    levels, trace = evolve(fitness, levels, ladder.top, cfg, state_file, show, plan.removable, plan.min_removed) \
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


def blocks_for_speedup(plan: Plan, n_layers: int, width: int, cfg) -> tuple[int, dict]:
    """The fewest whole blocks the search must remove for the latency table to predict cfg.search_speedup at
    this parameter budget. The budget is exact, so the kept MLP neurons follow from the number of blocks
    removed (each costs `block_neurons` of it) and only that number moves the prediction."""
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
