"""COMP as comprune runs it (docs/method.md; the paper's literal reading is `--preset comp-spec`):

1. layers:  score every block (block influence by default) in one dense pass; remove the k lowest.
2. heads:   optionally (head_share > 0), in each kept block, query heads inside GQA groups or whole KV groups
            leave first, by structured OBS over o_proj's channels, with o_proj refitted (methods/attention.py).
3. neurons: walk the kept blocks in order, each fed by the already-pruned blocks before it; in each MLP, remove
            neurons greedily by structured OBS (metric="obs"; "condition" is the paper's score on the dense
            columns), on a token-weighted Gram so the attention sink's massive activations do not own the fit.
            Each block loses the same number of neurons, or (width_allocation="adaptive") a number from a global
            ranking of normalised scores across blocks.
4. recovery: the kept down_proj columns refitted by damped least squares against the dense block (or the dense
            model's own trajectory, target_mix; or a removed span after the block, layer_compensation), folded
            into the weights; recovery="scales" keeps COMP's per-neuron scales.
5. surgery: slice the MLP now (so later blocks see the pruned outputs); drop blocks at the end.
Forward passes only: no autograd anywhere.
"""
from __future__ import annotations

import copy

import torch

from .. import distributed
from ..budget.plan import kept_width
from ..registry import Method, register
from ..masktune import error_from_gram, output_gram, solve_scales
from ..refit import BlockStats, dense_cross, refit, residual
from ..surgery import as_index, prune_mlp
from ..walk import (block_output, batch_shape, collect_stats, forward_block)
from .attention import prune_block_heads, prune_block_query_heads
from .experts import check_moe_config, prune_block_moe
from .search import search_allocation
from .comp_options import COMPOptions
from .adaptive import allocate_widths
from .common import choose_layers, layer_scores_bi, layer_scores_loss
from .neurons import select_neurons


def prune_block_mlp(layer, adapter, acts, n_remove: int, cfg, metric: str | None = None,
                    target=None) -> tuple[dict, object]:
    """Score, tune and slice one block's MLP on its (already-pruned-upstream) inputs; returns the record and
    the block's new outputs.

    target = (batches, weight): the block outputs the pruned block should reproduce, per calibration batch. The
    least-squares target of the MLP then moves from the dense MLP on the same inputs by weight · (target − the
    dense block's output here): weight 1 reproduces `batches` (the dense model's own trajectory, or the output
    of a removed span after this block), a smaller weight mixes both."""
    parts = adapter.mlp(layer)
    # Where the block ends with `y = r + mlp(norm(r))`, only the MLP is redone after pruning, and the block's
    # inputs are freed as the forward goes. What is kept per batch to rebuild y: either the MLP input x = norm(r)
    # and y - mlp(x), or r alone plus a copy of the dense MLP (less memory when the MLP's weights are smaller
    # than an activation buffer held in RAM). Both give the forward's own values bit for bit.
    mlp_is_residual = getattr(adapter, "mlp_output_is_residual", False)
    mlp = adapter.mlp_module(layer)
    mlp_bytes = sum(p.numel() * p.element_size() for p in mlp.parameters())
    act_bytes = acts.ntokens * batch_shape(acts.hidden, 0)[-1] * next(mlp.parameters()).element_size()
    rebuild = cfg.mlp_rebuild  # "r" / "x" force one way (tests: both give the same bits)
    keep_r_only = mlp_is_residual and (rebuild == "r" or (rebuild == "auto" and not acts.store.spills
                                                           and mlp_bytes < act_bytes))
    mlp_x, mlp_r, last, hooks = acts.store.new(), acts.store.new(), [], []
    if keep_r_only:
        hooks.append(adapter.mlp_input_norm(layer).register_forward_pre_hook(lambda m, args: mlp_r.append(args[0])))
    elif mlp_is_residual:
        hooks.append(mlp.register_forward_hook(lambda m, args, out: last.append((args[0], out))))

        def keep_x_and_rest(module, args, out):
            x, m = last.pop()
            mlp_x.append(x)
            mlp_r.append(block_output(out) - m)
        hooks.append(layer.register_forward_hook(keep_x_and_rest))
    own = BlockStats(parts.down, cfg.token_weight, target, adapter.output_norms) \
        if target is not None or cfg.token_weight != "none" else None
    if own is not None:
        hooks += own.attach(layer)
    try:
        stats, _ = collect_stats(layer, acts, {"down": parts.down}, gram=set() if own else {"down"}, forward=True,
                                 keep_outputs=False, consume=mlp_is_residual)
    finally:
        for h in hooks:
            h.remove()
    G = own.summed().G if own is not None else stats["down"].gram
    W = parts.down.weight.detach()
    least_squares = cfg.mask_tuning and cfg.recovery == "least-squares"
    C = dense_cross(G, W) if least_squares else None
    drift = own if target is not None else None
    if drift is not None:
        C += drift.D
    keep = select_neurons(metric or cfg.metric, G, parts, n_remove, cfg, C)
    K = output_gram(G, W)
    err_before = error_from_gram(K, keep)
    energy = error_from_gram(K, torch.zeros_like(keep))  # ||dense MLP output||^2
    idx = as_index(keep)
    scales, new_down = None, None
    if least_squares and (n_remove > 0 or drift is not None):
        new_down = refit(G, C, idx, cfg.damp)
        t_energy = own.t_energy if own is not None else energy
        err_before = residual(G, C, t_energy, idx, W.double().to(G.device)[:, idx])
        err_after = residual(G, C, t_energy, idx, new_down)
        energy = t_energy
        del C
    elif cfg.mask_tuning and n_remove > 0:
        scales = solve_scales(K, keep, cfg.ridge)
        err_after = error_from_gram(K, keep, scales)
    else:
        err_after = err_before
    dense_mlp = copy.deepcopy(mlp) if keep_r_only else None
    prune_mlp(adapter, layer, idx, scales)
    if new_down is not None:
        with torch.no_grad():
            parts.down.weight.copy_(new_down.to(parts.down.weight.dtype))
    del G, K, stats  # the f x f matrices are done with: free them before the outputs are rebuilt
    out = _outputs_after_mlp_change(layer, adapter, acts, mlp_x, mlp_r, dense_mlp)
    rec = {"width": int(idx.numel()), "kept_neurons": idx.tolist(),
           "rel_error_pruned": err_before / max(energy, 1e-30), "rel_error_tuned": err_after / max(energy, 1e-30)}
    if scales is not None:
        rec["scales"] = [float(x) for x in scales]
        rec["scale_mean"] = float(scales.mean())
        rec["scale_std"] = float(scales.std()) if scales.numel() > 1 else 0.0
    return rec, out


@torch.inference_mode()
def _outputs_after_mlp_change(layer, adapter, acts, mlp_x, mlp_r, dense_mlp=None):
    """Block outputs with the new MLP. Where the MLP output is the last residual add (block = r + mlp(x)),
    only the MLP is recomputed: y' = (y - mlp_dense(x)) + mlp_pruned(x), sparing the attention pass. mlp_x and
    mlp_r hold x and y - mlp_dense(x) per batch; or, with `dense_mlp`, mlp_r holds r and x, mlp_dense(x) and
    y = r + mlp_dense(x) are recomputed exactly as the forward computed them."""
    if not getattr(adapter, "mlp_output_is_residual", False):
        return forward_block(layer, acts)
    mlp = adapter.mlp_module(layer)
    norm = adapter.mlp_input_norm(layer)
    outs = acts.store.new()
    while mlp_r:  # consumed in order, each input freed as soon as its output exists
        r = mlp_r.pop(0)
        if dense_mlp is not None:
            x = norm(r)
            m = dense_mlp(x)
            y = r + m
            r = y - m
            del y, m
        else:
            x = mlp_x.pop(0)
        outs.append(r.add_(mlp(x)))
        del x, r
    return acts.like(outs)


def layer_stage(walk, acts, k: int) -> tuple[list[int], list[float]]:
    cfg = walk.cfg
    if k == 0 and cfg.layer_score == "bi":
        return [], []
    if cfg.layer_scores is not None:  # precomputed for this model + calibration (benchmarks)
        scores = list(cfg.layer_scores)
    elif cfg.layer_score == "loss":
        scores = layer_scores_loss(walk, acts, cfg.layer_score_nsamples)
    else:
        scores = layer_scores_bi(walk, acts)
    return choose_layers(scores, k, cfg.protect_first, cfg.protect_last), scores


@torch.inference_mode()
def copy_acts(acts):
    """An independent copy of a block's inputs (in files when the walk spills)."""
    hidden = acts.store.new()
    for h in acts.hidden:
        hidden.append(h.clone())
    return acts.like(hidden)


def _span_after(i: int, removed: set, n: int) -> list[int]:
    """The removed blocks directly after block i."""
    span = []
    while i + 1 + len(span) < n and i + 1 + len(span) in removed:
        span.append(i + 1 + len(span))
    return span


def _advance(walk, idx, acts):
    for j in idx:
        with walk.hold(walk.layers[j]):
            acts = forward_block(walk.layers[j], acts, consume=True)
    return acts


@torch.inference_mode()
def _target(walk, i, acts, dense, span):
    """What block i's MLP refit reproduces (see prune_block_mlp), or None for the dense MLP on the same inputs.
    `dense` is the dense trajectory already advanced past block i and `span`; layer compensation also runs
    the removed span on the pruned stream's dense block-i output (ReplaceMe's target, folded into down_proj)."""
    cfg = walk.cfg
    if span and cfg.layer_compensation:
        local = _advance(walk, [i] + span, copy_acts(acts))
        if dense is None:
            return local.hidden, 1.0
        a = cfg.target_mix
        mixed = acts.store.new()
        for b in range(len(local.hidden)):
            mixed.append(local.hidden[b].mul_(1 - a).add_(dense.hidden[b], alpha=a))
            local.hidden[b] = None
        return mixed, 1.0
    if dense is not None:
        return dense.hidden, cfg.target_mix
    return None


def plan(walk, acts):
    """The layer stage, then the widths (uniform, adaptive or searched), before any block changes."""
    adapter, cfg, budget = walk.adapter, walk.cfg, walk.budget
    if getattr(adapter, "moe", False):
        check_moe_config(cfg)
    # The layer stage consumes the block-0 inputs; recapturing them (embeddings only) is cheaper in memory than
    # keeping a copy through the dense pass (a third activation buffer).
    removed, layer_scores = layer_stage(walk, acts.take(), budget.layers_to_remove)
    acts = walk.capture()
    allocation, search = None, None
    if cfg.width_allocation == "adaptive":
        allocation = allocate_widths(walk, acts.take(), removed, budget.neurons_per_layer)
        acts = walk.capture()
    elif cfg.width_allocation == "search":
        allocation, search = search_allocation(walk, acts.take(), removed, budget.neurons_per_layer)
        removed = sorted(set(removed) | set(search.get("removed_blocks", ())))  # search_layers
        acts = walk.capture()
    return {"removed_layers": removed, "layer_scores": layer_scores, "neuron_allocation": allocation,
            "search": search}, acts


def step(walk, i, layer, acts, plan, carry):
    """Heads (if the budget takes any), then the MLP's neurons by structured OBS with the least-squares refit,
    on this block's inputs from the already-pruned blocks before it."""
    adapter, cfg, budget, layers = walk.adapter, walk.cfg, walk.budget, walk.layers
    acts, dense = acts if cfg.target_mix > 0 else (acts, None)
    span = _span_after(i, set(plan["removed_layers"]), len(layers))
    if dense is not None:  # the dense trajectory through block i (and the span it compensates)
        end = i + 1 + (len(span) if cfg.layer_compensation else 0)
        dense = _advance(walk, range(carry.get("dense_next", 0), end), dense)
        carry["dense_next"] = end
    moe = getattr(adapter, "moe", False)
    width = adapter.experts(layer).width if moe else adapter.mlp(layer).down.in_features
    allocation = plan["neuron_allocation"]
    n = budget.neurons_per_layer if allocation is None else allocation[i]
    n_remove = width - kept_width(width, n, cfg.round_to, cfg.min_width)
    head_rec = {}
    if budget.kv_groups_per_layer:
        head_rec = prune_block_heads(layer, adapter, acts, budget.kv_groups_per_layer, cfg)
    elif budget.query_heads_per_group:
        head_rec = prune_block_query_heads(layer, adapter, acts, budget.query_heads_per_group, cfg)
    target = _target(walk, i, acts, dense, span)
    if moe:
        rec, acts = prune_block_moe(layer, adapter, acts, budget.experts_per_layer, n_remove, cfg)
    else:
        rec, acts = prune_block_mlp(layer, adapter, acts, n_remove, cfg, target=target)
    del target
    return {**rec, **head_rec}, ((acts, dense) if dense is not None else acts)


def details(walk, plan, records) -> dict:
    out = {"removed_layers": plan["removed_layers"], "layer_scores": plan["layer_scores"], "blocks": records}
    for key in ("neuron_allocation", "search"):
        if plan.get(key) is not None:
            out[key] = plan[key]
    return out


def pack(walk, stream):
    """With a dense-trajectory target the walk carries two streams: the checkpoint holds the pruned batches, then
    the dense ones."""
    if walk.cfg.target_mix == 0:
        return stream
    pruned, dense = stream if isinstance(stream, tuple) else (stream, stream)
    return pruned.like(_joined(pruned.hidden, dense.hidden))


def unpack(walk, saved):
    if walk.cfg.target_mix == 0:
        return saved
    if isinstance(saved.hidden, _joined):  # nothing saved yet: both streams start at block 0's inputs
        raw = saved.like(saved.hidden.a)
        return raw, copy_acts(raw)
    first, last = distributed.batch_share(walk.input_ids.shape[0], walk.cfg.batch_size)
    n_batches = last - first  # this rank's
    if len(saved.hidden) != 2 * n_batches:
        return saved, copy_acts(saved)
    pruned_h, dense_h = saved.store.new(), saved.store.new()
    while len(saved.hidden):  # moved batch by batch (files stay files when the walk spills)
        (pruned_h if len(pruned_h) < n_batches else dense_h).append(saved.hidden.pop(0))
    return saved.like(pruned_h), saved.like(dense_h)


class _joined:
    """Two lists of batches read as one (index and length only: what a checkpoint save needs)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __len__(self):
        return len(self.a) + len(self.b)

    def __getitem__(self, i):
        return self.a[i] if i < len(self.a) else self.b[i - len(self.a)]


register(Method("comp", step, COMPOptions, plan=plan, details=details, pack=pack, unpack=unpack, desc="COMP neurons",
                uses_fitness=True, splits_budget=True, help="COMP: layers, then neurons (and heads) by structured "
                "OBS with least-squares recovery, block by block"))
