"""The baselines the COMP spec names (../shared/docs/comp.md, "Baselines"), in the same harness as COMP (same
calibration, budget and surgery); docs/comparison.md compares them with COMP, docs/baselines.md with their
official code.

- layer-drop  (ShortGPT): remove the k lowest-BI blocks, nothing else.
- wanda-sp:   MLP neurons by mean_i |W_ij| * ||X_:,j|| on down_proj inputs, uniform per layer, sequential
              (each block sees the pruned blocks before it), no compensation.
- magnitude:  MLP neurons by the L2 norm of their weights (gate/up rows, down column), uniform per layer.
- flap:       fluctuation metric on o_proj/down_proj inputs (dense pass), standardised per module, one global
              ranking of KV groups and MLP channels across all blocks (a group weighted by its parameter count),
              bias compensation stored as real biases (Llama's attention_bias/mlp_bias flags).
- llm-pruner: block-wise first-order Taylor |W * dL/dW| over coupled groups (GQA KV group: q/k/v rows + o
              columns; gqa_score='folded' scores it as LLM-Pruner's code does; MLP channel: gate/up rows + down column),
              uniform ratio over the middle blocks, no LoRA.
              The only method with a backward pass (needs_gradients).

Each run function carries `plan_budget` (its own split of the parameter budget; prune() uses it) and the
record of every kept block: {"width", "kept_neurons", "heads", "kv_heads", "kept_kv_heads", ...}.
"""
from __future__ import annotations

import torch

from .. import scores as S
from ..errors import CompruneError
from ..surgery import (add_bias, as_index, attention_parts, enable_biases, kv_group_channels, prune_expert_neurons,
                       prune_heads, prune_mlp, supports_biases)
from ..walk import InputStats, collect_stats, forward_block, model_device, progress, resident
from .common import (choose_layers, full_record, keep_lowest_removed, kept_width, layer_scores_bi, params_per_neuron,
                     plan_layers_only, plan_neurons_only)


def _record(adapter, layer, **extra) -> dict:
    rec = full_record(adapter, layer)
    rec.update(extra)
    return rec


# ----------------------------------------------------------------------------------------------- layer-drop
def run_layer_drop(model, adapter, acts, input_ids, cfg, budget, show=True) -> dict:
    scores = layer_scores_bi(model, adapter, acts, cfg.device, show)
    removed = choose_layers(scores, budget.layers_to_remove, cfg.protect_first, cfg.protect_last)
    layers = adapter.layers(model)
    blocks = {i: _record(adapter, layer) for i, layer in enumerate(layers) if i not in removed}
    return {"removed_layers": removed, "layer_scores": scores, "blocks": blocks,
            "ratio_note": "layer-drop removes whole blocks: the ratio is reached to within one block"}


run_layer_drop.plan_budget = plan_layers_only


# ------------------------------------------------------------------------------- uniform neuron baselines
def _uniform_n_remove(adapter, layer, budget, cfg) -> int:
    width = adapter.mlp(layer).down.in_features
    return width - kept_width(width, budget.neurons_per_layer, cfg.round_to, max(cfg.min_width, 1))


def _prune_experts_by(adapter, layer, n_remove: int, score_of) -> dict:
    """Every expert of a mixture-of-experts block loses its n_remove lowest-scoring neurons (score_of(e, expert))."""
    lst = adapter.experts(layer)
    kept = [as_index(keep_lowest_removed(score_of(e, ex), n_remove)) for e, ex in enumerate(lst.experts)]
    prune_expert_neurons(adapter, layer, kept, [None] * len(kept))
    return {"width": lst.width, "kept_neurons": [k.tolist() for k in kept]}


class _RoutedMoments:
    """Per expert, the moments of its down_proj inputs over the tokens routed to it (Wanda's ‖X_j‖², FLAP's
    variance); an expert no token chose has zeros."""

    def __init__(self, n: int, width: int):
        self.stats = [InputStats(n=width) for _ in range(n)]

    def __call__(self, e, x, a, w, y):
        self.stats[e].add(a)

    def sqnorm(self, e: int) -> torch.Tensor:
        s = self.stats[e]
        return s.sqnorm() if s.count else torch.zeros(s.n, dtype=torch.float64)

    def var(self, e: int) -> torch.Tensor:
        s = self.stats[e]
        return s.var() if s.count else torch.zeros(s.n, dtype=torch.float64)


def _wanda_sp_moe(layer, adapter, acts, n_remove: int) -> dict:
    lst = adapter.experts(layer)
    with lst.observing(_RoutedMoments(lst.num_experts, lst.width)) as st:
        forward_block(layer, acts, keep=False)
    return _prune_experts_by(adapter, layer, n_remove, lambda e, ex: S.wanda_sp_scores(
        ex.down_proj.weight.detach(), st.sqnorm(e)))


def run_wanda_sp(model, adapter, acts, input_ids, cfg, budget, show=True) -> dict:
    """Sequential: stats of block l come from the already-pruned blocks before it (Wanda's loop). On
    mixture-of-experts blocks, the same score per expert on the tokens routed to it."""
    blocks = {}
    for i, layer in enumerate(progress(adapter.layers(model), "wanda-sp", show)):
        if getattr(adapter, "moe", False):
            with resident(layer, cfg.device):
                rec = _wanda_sp_moe(layer, adapter, acts, budget.neurons_per_layer)
                acts = forward_block(layer, acts, consume=True)
            blocks[i] = _record(adapter, layer, **rec)
            continue
        with resident(layer, cfg.device):
            parts = adapter.mlp(layer)
            stats, _ = collect_stats(layer, acts, {"down": parts.down}, forward=True, keep_outputs=False)
            score = S.wanda_sp_scores(parts.down.weight.detach(), stats["down"].sqnorm())
            keep = keep_lowest_removed(score, _uniform_n_remove(adapter, layer, budget, cfg))
            idx = as_index(keep)
            prune_mlp(adapter, layer, idx)
            acts = forward_block(layer, acts, consume=True)
        blocks[i] = _record(adapter, layer, kept_neurons=idx.tolist(), width=int(idx.numel()))
    return {"removed_layers": [], "blocks": blocks}


def run_magnitude(model, adapter, acts, input_ids, cfg, budget, show=True) -> dict:
    """Data-free: the calibration pass is not used."""
    blocks = {}
    for i, layer in enumerate(progress(adapter.layers(model), "magnitude", show)):
        if getattr(adapter, "moe", False):
            blocks[i] = _record(adapter, layer, **_prune_experts_by(
                adapter, layer, budget.neurons_per_layer, lambda e, ex: S.magnitude_scores(
                    ex.up_proj.weight.detach(), ex.down_proj.weight.detach().T, ex.gate_proj.weight.detach())))
            continue
        parts = adapter.mlp(layer)
        rows = [parts.up.weight, parts.down.weight.T] + ([parts.gate.weight] if parts.gate is not None else [])
        score = S.magnitude_scores(*[w.detach() for w in rows])
        idx = as_index(keep_lowest_removed(score, _uniform_n_remove(adapter, layer, budget, cfg)))
        prune_mlp(adapter, layer, idx)
        blocks[i] = _record(adapter, layer, kept_neurons=idx.tolist(), width=int(idx.numel()))
    return {"removed_layers": [], "blocks": blocks}


run_wanda_sp.plan_budget = plan_neurons_only
run_magnitude.plan_budget = plan_neurons_only


# ----------------------------------------------------------------------------------------------------- FLAP
def _bias_overhead(model, adapter, ratio: float) -> int:
    """Parameters the compensation biases add (zero q/k/v/gate/up biases included), estimated before the
    selection with kept widths ~ (1 - ratio) of the full ones."""
    total = 0
    for layer in adapter.layers(model):
        a = attention_parts(adapter, layer)
        m = adapter.mlp(layer)
        fixed = a.o.out_features * (a.o.bias is None) + m.down.out_features * (m.down.bias is None)
        scaled = sum(lin.out_features * (lin.bias is None) for lin in (a.q, a.k, a.v, m.up, m.gate) if lin is not None)
        total += fixed + int(round((1 - ratio) * scaled))
    return total


def flap_select(units: list[tuple[float, int, int, str, int]], target: float, n_units: dict) -> set:
    """Global ranking: remove units (score, params, layer, kind, index) lowest score first, never emptying a
    module, stopping at the prefix whose removed parameters are closest to `target`."""
    left = dict(n_units)
    order = sorted(units, key=lambda u: (u[0], u[2], u[3], u[4]))
    chosen, removed, best, best_len = [], 0, abs(target), 0
    for u in order:
        key = (u[2], u[3])
        if left[key] <= 1:
            continue
        if removed >= target:
            break
        left[key] -= 1
        chosen.append(u)
        removed += u[1]
        if abs(target - removed) < best:
            best, best_len = abs(target - removed), len(chosen)
    return {(u[2], u[3], u[4]) for u in chosen[:best_len]}


def _run_flap_moe(model, adapter, acts, cfg, budget, show=True) -> dict:
    """FLAP's uniform structure (its UL-UM option) on mixture-of-experts blocks: the config holds one expert
    width for every block, so each expert loses as many channels, the lowest fluctuation Var(X_j)·‖W_:,j‖² on
    the tokens routed to it, from a dense pass. No bias compensation: an expert's removed-channel mean is
    routing-weighted per token, which no bias of the shared output can hold. Attention is kept (one head
    count per config too)."""
    blocks = {}
    for i, layer in enumerate(progress(adapter.layers(model), "FLAP (experts)", show)):
        with resident(layer, cfg.device):
            lst = adapter.experts(layer)
            with lst.observing(_RoutedMoments(lst.num_experts, lst.width)) as st:
                acts = forward_block(layer, acts, consume=True)
            rec = _prune_experts_by(adapter, layer, budget.neurons_per_layer, lambda e, ex: S.fluctuation_scores(
                ex.down_proj.weight.detach(), st.var(e)))
        blocks[i] = _record(adapter, layer, **rec, bias_compensation=False)
    return {"removed_layers": [], "blocks": blocks, "bias_compensation": False, "structure": "UL-UM",
            "note": "mixture-of-experts: uniform widths (one expert width per config), no bias compensation "
                    "(experts have no bias), attention kept"}


def run_flap(model, adapter, acts, input_ids, cfg, budget, show=True) -> dict:
    if getattr(adapter, "moe", False):
        return _run_flap_moe(model, adapter, acts, cfg, budget, show)
    layers = adapter.layers(model)
    per_layer = []
    # 1. one dense pass: mean and variance of the inputs of o_proj and down_proj in every block
    for layer in progress(layers, "FLAP stats", show):
        with resident(layer, cfg.device):
            a = attention_parts(adapter, layer)
            m = adapter.mlp(layer)
            stats, acts = collect_stats(layer, acts, {"o": a.o, "down": m.down}, forward=True)
            per_layer.append({
                "head": S.flap_head_scores(a.o.weight.detach(), stats["o"].var(), a.n_kv).cpu(),
                "mlp": S.flap_channel_scores(m.down.weight.detach(), stats["down"].var()).cpu(),
                "mean_o": stats["o"].mean().cpu(), "mean_down": stats["down"].mean().cpu(),
                "group_params": a.group_params(), "neuron_params": params_per_neuron(adapter, layer)})
    # 2. one global ranking; biases are parameters too, so the target includes what compensation adds
    bias = bool(cfg.flap_bias) and supports_biases(model)
    target = budget.params_to_remove + (_bias_overhead(model, adapter, cfg.ratio) if bias else 0)
    units, n_units = [], {}
    heads_ok = adapter.head_pruning_refusal(model.config) is None  # else the ranking holds MLP channels only
    for i, st in enumerate(per_layer):
        if heads_ok:
            units += [(float(s), st["group_params"], i, "attn", g) for g, s in enumerate(st["head"])]
        units += [(float(s), st["neuron_params"], i, "mlp", j) for j, s in enumerate(st["mlp"])]
        n_units[(i, "attn")], n_units[(i, "mlp")] = len(st["head"]), len(st["mlp"])
    chosen = flap_select(units, target, n_units)
    # 3. surgery with compensation: b = W[:, removed] @ mean(X[:, removed]) (dense-pass means)
    if bias:
        enable_biases(model, adapter)
    blocks = {}
    for i, (layer, st) in enumerate(zip(layers, per_layer)):
        a = attention_parts(adapter, layer)
        m = adapter.mlp(layer)
        drop_kv = torch.tensor(sorted(g for (l, k, g) in chosen if l == i and k == "attn"), dtype=torch.long)
        drop_n = torch.tensor(sorted(j for (l, k, j) in chosen if l == i and k == "mlp"), dtype=torch.long)
        keep_kv = torch.ones(a.n_kv, dtype=torch.bool)
        keep_kv[drop_kv] = False
        keep_n = torch.ones(m.down.in_features, dtype=torch.bool)
        keep_n[drop_n] = False
        if bias and drop_kv.numel():
            qo, _ = kv_group_channels(a, drop_kv)
            add_bias(a.o, S.compensation_bias(a.o.weight.detach(), st["mean_o"], qo))
        if bias and drop_n.numel():
            add_bias(m.down, S.compensation_bias(m.down.weight.detach(), st["mean_down"], drop_n))
        if drop_kv.numel():
            prune_heads(adapter, layer, keep_kv)
        if drop_n.numel():
            prune_mlp(adapter, layer, keep_n)
        blocks[i] = _record(adapter, layer, kept_neurons=as_index(keep_n).tolist(),
                            kept_kv_heads=as_index(keep_kv).tolist(), bias_compensation=bias,
                            head_scores=[float(x) for x in st["head"]])
    out = {"removed_layers": [], "blocks": blocks, "bias_compensation": bias}
    if not heads_ok:
        out["heads_kept"] = adapter.head_pruning_refusal(model.config)
    if cfg.flap_bias and not bias:
        out["note"] = "bias compensation skipped: this architecture has no bias flags for o_proj/down_proj"
    return out


run_flap.plan_budget = plan_neurons_only


# ----------------------------------------------------------------------------------------------- LLM-Pruner
def middle_blocks(n_layers: int, cfg) -> tuple[int, int]:
    """LLM-Pruner's LLaMA-7B recipe prunes blocks 4..29 of 32; the same proportions for other depths
    (override with cfg.extra['block_start'] / ['block_end'], end exclusive)."""
    start = cfg.extra.get("block_start", int(round(4 / 32 * n_layers)))
    end = cfg.extra.get("block_end", n_layers - int(round(2 / 32 * n_layers)))
    start, end = max(0, int(start)), min(n_layers, int(end))
    if end <= start:
        raise CompruneError(f"llm-pruner: empty block range [{start}, {end}) for {n_layers} layers")
    return start, end


def loss_gradients(model, input_ids: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over the windows and its gradient w.r.t. every parameter (into .grad)."""
    dev = model_device(model)
    n = input_ids.shape[0]
    total = 0.0
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for batch in input_ids.split(batch_size):
            batch = batch.to(dev)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss * (batch.shape[0] / n)
            loss.backward()
            total += float(loss.detach())
    return total


GQA_SCORES = {"group": S.taylor_kv_groups, "folded": S.taylor_kv_groups_folded}


def taylor_group_score(cfg):
    """cfg.extra['gqa_score']: 'group' (the default: a KV group's own q/k/v rows and o columns) or 'folded'
    (what LLM-Pruner's own code computes on GQA models, crediting query head h to KV head h mod n_kv: it
    reproduces the official runs; neither is reliably better on SmolLM2, docs/baselines.md)."""
    name = cfg.extra.get("gqa_score", "group")
    if name not in GQA_SCORES:
        raise CompruneError(f"llm-pruner: gqa_score '{name}' is not one of {', '.join(GQA_SCORES)}")
    return GQA_SCORES[name]


def plan_llm_pruner(model, adapter, cfg):
    return plan_neurons_only(model, adapter, cfg)


def run_llm_pruner(model, adapter, acts, input_ids, cfg, budget, show=True) -> dict:
    n = min(int(cfg.extra.get("taylor_nsamples", 10)), input_ids.shape[0])
    t = min(int(cfg.extra.get("taylor_seqlen", 64)), input_ids.shape[1])
    ids = input_ids[:n, :t]
    layers = adapter.layers(model)
    start, end = middle_blocks(len(layers), cfg)
    heads_ok = adapter.head_pruning_refusal(model.config) is None
    group_score = taylor_group_score(cfg)
    params = list(model.parameters())
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    try:
        for p in params:
            p.requires_grad_(True)
        loss = loss_gradients(model, ids, max(1, cfg.batch_size))
        blocks, per_block = {}, budget.params_to_remove / (end - start)
        for i, layer in enumerate(progress(layers, "LLM-Pruner", show)):
            if not start <= i < end:
                blocks[i] = _record(adapter, layer)
                continue
            a = attention_parts(adapter, layer)
            m = adapter.mlp(layer)
            pair = lambda lin: (lin.weight.detach(), lin.weight.grad)  # noqa: E731
            g_scores = group_score(pair(a.q), pair(a.k), pair(a.v), pair(a.o), a.head_dim, a.rep)
            n_scores = S.taylor_mlp_channels(pair(m.gate) if m.gate is not None else None, pair(m.up), pair(m.down))
            block_params = sum(p.numel() for p in layer.parameters())
            r = per_block / block_params
            if r >= 1:
                raise CompruneError(f"llm-pruner: ratio {cfg.ratio} needs {r:.0%} of every block in "
                                    f"[{start}, {end}): lower --ratio")
            g_rm = min(int(round(r * a.n_kv)), a.n_kv - 1) if heads_ok else 0
            width = m.down.in_features
            n_rm = int(round((per_block - g_rm * a.group_params()) / params_per_neuron(adapter, layer)))
            n_rm = min(max(n_rm, 0), width - 1)
            keep_kv = keep_lowest_removed(g_scores, g_rm)
            keep_n = keep_lowest_removed(n_scores, width - kept_width(width, n_rm, cfg.round_to, 1))
            for lin in (a.q, a.k, a.v, a.o, m.up, m.down) + ((m.gate,) if m.gate is not None else ()):
                lin.weight.grad = None
            if g_rm:
                prune_heads(adapter, layer, keep_kv)
            prune_mlp(adapter, layer, keep_n)
            blocks[i] = _record(adapter, layer, kept_neurons=as_index(keep_n).tolist(),
                                kept_kv_heads=as_index(keep_kv).tolist(), block_ratio=r,
                                group_scores=[float(x) for x in g_scores])
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():  # inference weights, as surgery leaves them
            p.requires_grad_(False)
        model.train(was_training)
    return {"removed_layers": [], "blocks": blocks, "taylor": {"nsamples": n, "seqlen": t, "loss": loss,
                                                               "blocks": [start, end],
                                                               "gqa_score": cfg.extra.get("gqa_score", "group")}}


run_llm_pruner.needs_gradients = True
run_llm_pruner.plan_budget = plan_llm_pruner


BASELINES = {"layer-drop": run_layer_drop, "wanda-sp": run_wanda_sp, "magnitude": run_magnitude,
             "flap": run_flap, "llm-pruner": run_llm_pruner}
