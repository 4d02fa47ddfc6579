"""LLM-Pruner: block-wise first-order Taylor |W * dL/dW| over coupled groups (GQA KV group: q/k/v rows + o columns;
gqa_score='folded' scores it as LLM-Pruner's code does; MLP channel: gate/up rows + down column), uniform ratio
over the middle blocks, no LoRA. The only method with a backward pass: its plan is the gradient pass and every
block's choice; the walk then cuts block by block."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed, scores as S
from ..errors import CompruneError
from ..registry import Method, register
from ..surgery import as_index, attention_parts, prune_heads, prune_mlp
from ..walk import model_device
from .baseline_parts import record
from ..budget.plan import kept_width, params_per_neuron, plan_neurons_only
from .common import keep_lowest_removed
from .comp_options import opt


def middle_blocks(n_layers: int, cfg) -> tuple[int, int]:
    """LLM-Pruner's LLaMA-7B recipe prunes blocks 4..29 of 32; the same proportions for other depths
    (override with block_start / block_end, end exclusive)."""
    start = int(round(4 / 32 * n_layers)) if cfg.block_start is None else cfg.block_start
    end = n_layers - int(round(2 / 32 * n_layers)) if cfg.block_end is None else cfg.block_end
    start, end = max(0, int(start)), min(n_layers, int(end))
    if end <= start:
        raise CompruneError(f"llm-pruner: empty block range [{start}, {end}) for {n_layers} layers")
    return start, end


def loss_gradients(model, input_ids: torch.Tensor, batch_size: int, total: int | None = None) -> float:
    """Mean next-token loss over the windows and its gradient w.r.t. every parameter (into .grad); with
    `total`, these windows are a share of `total` windows (a rank's) and the mean is over all of them."""
    dev = model_device(model)
    n = input_ids.shape[0] if total is None else total
    total = 0.0
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for batch in input_ids.split(batch_size):
            batch = batch.to(dev)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss * (batch.shape[0] / n)
            loss.backward()
            total += float(loss.detach())
    return total


def _summed_gradients(model, input_ids, n: int, t: int, batch_size: int, blocks) -> float:
    """loss_gradients on the first n windows (t tokens each); in a process group, each rank's share of them and
    the gradients of the scored blocks summed over the ranks (comprune.distributed)."""
    if not distributed.active():
        return loss_gradients(model, input_ids[:n, :t], batch_size)
    share = distributed.window_share(input_ids.shape[0], batch_size)
    lo, hi = share.start, max(share.start, min(share.stop, n))
    loss = loss_gradients(model, input_ids[lo:hi, :t], batch_size, total=n) if hi > lo else 0.0
    for block in blocks:
        for p in block.parameters():
            if p.grad is None:  # a rank with none of the n windows
                p.grad = torch.zeros_like(p)
            distributed.all_reduce_sum(p.grad)
    return distributed.sum_floats(loss)[0]


GQA_SCORES = {"group": S.taylor_kv_groups, "folded": S.taylor_kv_groups_folded}


def taylor_group_score(cfg):
    """gqa_score: 'group' (the default: a KV group's own q/k/v rows and o columns) or 'folded'
    (what LLM-Pruner's own code computes on GQA models, crediting query head h to KV head h mod n_kv: it
    reproduces the official runs; neither is reliably better on SmolLM2, docs/baselines.md)."""
    name = cfg.gqa_score
    if name not in GQA_SCORES:
        raise CompruneError(f"llm-pruner: gqa_score '{name}' is not one of {', '.join(GQA_SCORES)}")
    return GQA_SCORES[name]


@dataclass(frozen=True)
class LLMPrunerOptions:
    taylor_nsamples: int = opt(10, "llm-pruner: calibration windows of the Taylor gradient pass")
    taylor_seqlen: int = opt(64, "llm-pruner: tokens per window of the gradient pass")
    gqa_score: str = opt("group", "llm-pruner: a KV group's own q/k/v rows and o columns (group), or LLM-Pruner's "
                         "code's crediting of query head h to KV head h mod n_kv (folded)", tuple(GQA_SCORES))
    block_start: int | None = opt(None, "llm-pruner: first pruned block (default: LLaMA-7B's 4/32 of the depth)")
    block_end: int | None = opt(None, "llm-pruner: end of the pruned blocks, exclusive (default: all but 2/32)")

    def validate(self, cfg) -> None:
        if self.taylor_nsamples < 1 or self.taylor_seqlen < 2:
            raise CompruneError("llm-pruner: taylor_nsamples must be >= 1 and taylor_seqlen >= 2")


def plan(walk, acts) -> tuple[dict, None]:
    """The gradient pass on the dense model, then every middle block's kept KV groups and neurons."""
    model, adapter, cfg, budget = walk.model, walk.adapter, walk.cfg, walk.budget
    n = min(int(cfg.taylor_nsamples), walk.input_ids.shape[0])
    t = min(int(cfg.taylor_seqlen), walk.input_ids.shape[1])
    layers = adapter.layers(model)
    start, end = middle_blocks(len(layers), cfg)
    heads_ok = adapter.head_pruning_refusal(model.config) is None
    group_score = taylor_group_score(cfg)
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    blocks = {}
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        loss = _summed_gradients(model, walk.input_ids, n, t, max(1, cfg.batch_size), layers[start:end])
        per_block = budget.params_to_remove / (end - start)
        for i in range(start, end):
            layer = layers[i]
            a, m = attention_parts(adapter, layer), adapter.mlp(layer)
            pair = lambda lin: (lin.weight.detach(), lin.weight.grad)  # noqa: E731
            g_scores = group_score(pair(a.q), pair(a.k), pair(a.v), pair(a.o), a.head_dim, a.rep)
            n_scores = S.taylor_mlp_channels(pair(m.gate) if m.gate is not None else None, pair(m.up), pair(m.down))
            r = per_block / sum(p.numel() for p in layer.parameters())
            if r >= 1:
                raise CompruneError(f"llm-pruner: ratio {cfg.ratio} needs {r:.0%} of every block in "
                                    f"[{start}, {end}): lower --ratio")
            g_rm = min(int(round(r * a.n_kv)), a.n_kv - 1) if heads_ok else 0
            width = m.down.in_features
            n_rm = int(round((per_block - g_rm * a.group_params()) / params_per_neuron(adapter, layer)))
            n_rm = min(max(n_rm, 0), width - 1)
            blocks[str(i)] = {"kept_kv": as_index(keep_lowest_removed(g_scores, g_rm)).tolist(), "g_rm": g_rm,
                              "kept_n": as_index(keep_lowest_removed(
                                  n_scores, width - kept_width(width, n_rm, cfg.round_to, 1))).tolist(),
                              "block_ratio": r, "group_scores": [float(x) for x in g_scores]}
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():  # inference weights, as surgery leaves them
            p.requires_grad_(False)
        model.train(was_training)
    return {"blocks": blocks, "taylor": {"nsamples": n, "seqlen": t, "loss": loss, "blocks": [start, end],
                                         "gqa_score": cfg.gqa_score}}, None


def step(walk, i, layer, acts, plan, carry):
    adapter = walk.adapter
    p = plan["blocks"].get(str(i))
    if p is None:
        return record(adapter, layer), None
    kept_kv, kept_n = torch.tensor(p["kept_kv"], dtype=torch.long), torch.tensor(p["kept_n"], dtype=torch.long)
    if p["g_rm"]:
        prune_heads(adapter, layer, kept_kv)
    prune_mlp(adapter, layer, kept_n)
    return record(adapter, layer, kept_neurons=p["kept_n"], kept_kv_heads=p["kept_kv"],
                  block_ratio=p["block_ratio"], group_scores=p["group_scores"]), None


def details(walk, plan, records) -> dict:
    return {"removed_layers": [], "blocks": records, "taylor": plan["taylor"]}


register(Method("llm-pruner", step, LLMPrunerOptions, plan=plan, details=details, desc="LLM-Pruner",
                plan_budget=plan_neurons_only, needs_gradients=True,
                help="LLM-Pruner: first-order Taylor over coupled groups (backward passes), no LoRA"))
