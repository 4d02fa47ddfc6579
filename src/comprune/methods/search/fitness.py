"""The search's fitness: KL(dense ‖ stitched) of the next-token distributions on windows held apart from the
calibration, the stitched model being the layer-pruned model with each block's MLP replaced by its variant. The
dense distributions are computed once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import distributed
from ...evaluate.perplexity import family_logits
from ...walk import Activations, capture, forward_block, resident
from .database import _narrowed


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


def dense_moments(logp: torch.Tensor, head, config) -> _Moments:
    """The moments standing for the dense log-probabilities `logp` [rows, T, V] of a linear LM head `head`
    (Fitness._reference says why they suffice)."""
    prob = logp.exp()
    scale = 1.0 / float(getattr(config, "logits_scaling", None) or 1.0)
    W, b = head.weight, head.bias
    m = (prob @ W.to(prob.device).float()) * scale  # [rows, T, d]: the head's input dimension
    const = (prob * logp).sum(-1)
    if b is not None:
        const = const - (prob @ b.to(prob.device).float()) * scale
    return _Moments(m, const, prob.sum(-1))


def kl_sum(ref, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of KL(dense ‖ model) as a float64 scalar (differentiable), from the dense reference (moments,
    or float16 log-probabilities), the model's final normed hidden states x and its logits z."""
    if isinstance(ref, _Moments):
        return (ref.const - (x.float() * ref.m).sum(-1) + torch.logsumexp(z.float(), -1) * ref.mass).double().sum()
    ref = ref.float()
    return (ref.exp() * (ref - torch.log_softmax(z.float(), -1))).sum().double()


class Fitness:
    """KL(dense ‖ stitched) per token on held-apart windows, from block-0 inputs kept in memory.

    In a process group each rank holds its share of the windows (whole batches); `windows` names every window
    by its batch among all ranks', a rank evaluates the ones it holds, and the KL sums and token counts are
    summed over the ranks (comprune.distributed), so every rank gets the one-process fitness."""

    def __init__(self, model, adapter, removed: list[int], db: dict, fit_ids: torch.Tensor, cfg, walk=None):
        self.adapter, self.cfg, self.db = adapter, cfg, db
        # how modules are held and where activations live: the walk's (a streamed prune reads blocks from disk)
        self.hold = walk.hold if walk is not None else (lambda m: resident(m, cfg.device))
        self.removed_level = None  # the level that removes a whole block (search_layers), above every ladder level
        self.layers = adapter.layers(model)
        self.norm, self.head = adapter.head(model)
        self.logit_fn = family_logits(model) or (lambda x: x)
        self.kept = [i for i in range(len(self.layers)) if i not in set(removed)]
        self.x0 = walk.capture(fit_ids) if walk is not None else capture(model, adapter, fit_ids, cfg.batch_size,
                                                                         cfg.device)
        n, bs = fit_ids.shape[0], cfg.batch_size
        self.first, self.last = distributed.batch_share(n, bs) if walk is not None else (0, len(self.x0.hidden))
        self.head_config = model.config
        self.linear_head = not getattr(model.config, "final_logit_softcapping", None)
        with torch.inference_mode():
            self.ref = [self._reference(h) for h in self._run(self.x0, range(len(self.layers))).hidden]
        # Single windows for the cheap stages (error curves, offspring filter): the LM head over the vocabulary
        # costs as much as a third of the blocks, so those stages read few tokens.
        self.windows = [(b, j) for b in range(-(-n // bs)) for j in range(min(bs, n - b * bs))]
        self.evaluations = 0

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        with self.hold(self.head):
            return self.logit_fn(self.head(x).float())

    def _normed(self, h: torch.Tensor) -> torch.Tensor:
        with self.hold(self.norm):
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
        with self.hold(self.head):
            return dense_moments(logp, self.head, self.head_config)

    @torch.inference_mode()
    def _kl_sum(self, ref, h: torch.Tensor) -> float:
        """Σ over tokens of KL(dense ‖ stitched), from the dense reference and the stitched hidden states."""
        x = self._normed(h)
        return float(kl_sum(ref, x, self._logits(x)))

    def _run(self, acts, blocks, levels=None) -> Activations:
        for i in blocks:
            with self.hold(self.layers[i]):
                if levels is not None and levels[i] == self.removed_level:
                    continue  # the block is skipped: its inputs go on to the next
                if levels is None or levels[i] == 0:
                    acts = forward_block(self.layers[i], acts)
                    continue
                with _narrowed(self.adapter.mlp(self.layers[i]), *self.db.variant(i, levels[i])):
                    acts = forward_block(self.layers[i], acts)
        return acts

    def _local(self, windows):
        """The windows this rank holds, by its own batch numbers (None: all of them)."""
        if windows is None:
            return None
        return [(b - self.first, j) for b, j in windows if self.first <= b < self.last]

    def subset(self, windows=None) -> tuple[Activations, list[torch.Tensor]]:
        """Block-0 inputs and reference log-probabilities of some windows ((batch, row) pairs), or of all, as
        batches of the same shapes: those this rank holds."""
        return self._subset(self._local(windows))

    def _subset(self, windows):
        if windows is None:
            return self.x0, self.ref
        hidden, kwargs, ref = [], [], []
        for b, j in windows:
            hidden.append(self.x0.hidden[b][j:j + 1])
            kwargs.append(_row_kwargs(self.x0.kwargs[b], j, self.x0.hidden[b].shape[0]))
            ref.append(self.ref[b][j:j + 1])
        return Activations(hidden, kwargs, self.x0.store), ref

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
        total, count = distributed.sum_floats(total, count)
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
        windows = self._local(windows)
        x0, refs = self._subset(windows)
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
                    acts = Activations([torch.cat(hs) if len(hs) > 1 else hs[0]], [_repeat_kwargs(kw, rows, len(hs))],
                                       self.x0.store)
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
        *totals, count = distributed.sum_floats(*totals, count)
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
                              [_repeat_kwargs(kw, 1, len(levels)) for kw in acts.kwargs], acts.store)
        out = self._run(stacked, [j for j in self.kept if j > i])
        total, count = [0.0] * len(levels), 0
        for ref, h in zip(refs, out.hidden):
            for k, hk in enumerate(h.split(ref.shape[0])):  # one level's rows at a time: the head's output is big
                total[k] += self._kl_sum(ref, hk)
            count += ref.shape[0] * ref.shape[1]
        self.evaluations += len(levels)
        *total, count = distributed.sum_floats(*total, count)
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
