"""FLAP: the fluctuation metric on o_proj/down_proj inputs (one dense pass), standardised per module, one global
ranking of KV groups and MLP channels across all blocks (a group weighted by its parameter count), and bias
compensation stored as real biases (Llama's attention_bias/mlp_bias flags)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import scores as S
from ..registry import Method, register
from ..sequential import walk_blocks
from ..surgery import add_bias, as_index, attention_parts, enable_biases, kv_group_channels, prune_heads, prune_mlp, \
    supports_biases
from ..walk import collect_stats, forward_block
from .baseline_parts import RoutedMoments, prune_experts_by, record
from ..budget.plan import params_per_neuron, plan_neurons_only
from .comp_options import opt


@dataclass(frozen=True)
class FlapOptions:
    flap_bias: bool = opt(True, "flap: store the removed channels' mean contribution as real biases (FLAP's "
                          "compensation; where the architecture has bias flags)")

    def validate(self, cfg) -> None:
        pass


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


def _step_moe(walk, i, layer, acts):
    """FLAP's uniform structure (its UL-UM option) on mixture-of-experts blocks: the config holds one expert
    width for every block, so each expert loses as many channels, the lowest fluctuation Var(X_j)·‖W_:,j‖² on
    the tokens routed to it, from a dense pass. No bias compensation: an expert's removed-channel mean is
    routing-weighted per token, which no bias of the shared output can hold. Attention is kept (one head
    count per config too)."""
    lst = walk.adapter.experts(layer)
    with lst.observing(RoutedMoments(lst.num_experts, lst.width)) as st:
        acts = forward_block(layer, acts, consume=True)
    rec = prune_experts_by(walk.adapter, layer, walk.budget.neurons_per_layer, lambda e, ex: S.fluctuation_scores(
        ex.down_proj.weight.detach(), st.var(e)))
    return record(walk.adapter, layer, **rec, bias_compensation=False), acts


def plan(walk, acts) -> tuple[dict, None]:
    """One dense pass for the mean and variance of the inputs of o_proj and down_proj in every block, then one
    global ranking; biases are parameters too, so the target includes what compensation adds."""
    model, adapter, cfg = walk.model, walk.adapter, walk.cfg
    if getattr(adapter, "moe", False):
        return {"moe": True}, acts
    per_layer = []

    def stats_step(walk, i, layer, acts, plan, carry):
        a, m = attention_parts(adapter, layer), adapter.mlp(layer)
        stats, acts = collect_stats(layer, acts, {"o": a.o, "down": m.down}, forward=True)
        per_layer.append({
            "head": S.flap_head_scores(a.o.weight.detach(), stats["o"].var(), a.n_kv).cpu(),
            "mlp": S.flap_channel_scores(m.down.weight.detach(), stats["down"].var()).cpu(),
            "mean_o": stats["o"].mean().cpu(), "mean_down": stats["down"].mean().cpu(),
            "group_params": a.group_params(), "neuron_params": params_per_neuron(adapter, layer)})
        return None, acts

    walk_blocks(walk.without_checkpoint(), acts, stats_step, desc="FLAP stats")
    bias = bool(cfg.flap_bias) and supports_biases(model)
    target = walk.budget.params_to_remove + (_bias_overhead(model, adapter, cfg.ratio) if bias else 0)
    units, n_units = [], {}
    heads_ok = adapter.head_pruning_refusal(model.config) is None  # else the ranking holds MLP channels only
    for i, st in enumerate(per_layer):
        if heads_ok:
            units += [(float(s), st["group_params"], i, "attn", g) for g, s in enumerate(st["head"])]
        units += [(float(s), st["neuron_params"], i, "mlp", j) for j, s in enumerate(st["mlp"])]
        n_units[(i, "attn")], n_units[(i, "mlp")] = len(st["head"]), len(st["mlp"])
    chosen = flap_select(units, target, n_units)
    blocks = {}
    for i, st in enumerate(per_layer):
        blocks[str(i)] = {"drop_kv": sorted(g for (l, k, g) in chosen if l == i and k == "attn"),
                          "drop_n": sorted(j for (l, k, j) in chosen if l == i and k == "mlp"),
                          "mean_o": st["mean_o"].tolist(), "mean_down": st["mean_down"].tolist(),
                          "head_scores": [float(x) for x in st["head"]]}
    return {"bias": bias, "heads_ok": heads_ok, "blocks": blocks}, None


def prepare(walk, plan):
    if plan.get("bias"):
        enable_biases(walk.model, walk.adapter)


def step(walk, i, layer, acts, plan, carry):
    """Surgery with compensation: b = W[:, removed] @ mean(X[:, removed]) (dense-pass means)."""
    adapter = walk.adapter
    if plan.get("moe"):
        return _step_moe(walk, i, layer, acts)
    p = plan["blocks"][str(i)]
    a, m = attention_parts(adapter, layer), adapter.mlp(layer)
    drop_kv, drop_n = torch.tensor(p["drop_kv"], dtype=torch.long), torch.tensor(p["drop_n"], dtype=torch.long)
    keep_kv = torch.ones(a.n_kv, dtype=torch.bool)
    keep_kv[drop_kv] = False
    keep_n = torch.ones(m.down.in_features, dtype=torch.bool)
    keep_n[drop_n] = False
    if plan["bias"] and drop_kv.numel():
        qo, _ = kv_group_channels(a, drop_kv)
        add_bias(a.o, S.compensation_bias(a.o.weight.detach(), torch.tensor(p["mean_o"], dtype=torch.float64), qo))
    if plan["bias"] and drop_n.numel():
        add_bias(m.down, S.compensation_bias(m.down.weight.detach(),
                                             torch.tensor(p["mean_down"], dtype=torch.float64), drop_n))
    if drop_kv.numel():
        prune_heads(adapter, layer, keep_kv)
    if drop_n.numel():
        prune_mlp(adapter, layer, keep_n)
    return record(adapter, layer, kept_neurons=as_index(keep_n).tolist(), kept_kv_heads=as_index(keep_kv).tolist(),
                  bias_compensation=plan["bias"], head_scores=p["head_scores"]), None


def details(walk, plan, records) -> dict:
    if plan.get("moe"):
        return {"removed_layers": [], "blocks": records, "bias_compensation": False, "structure": "UL-UM",
                "note": "mixture-of-experts: uniform widths (one expert width per config), no bias compensation "
                        "(experts have no bias), attention kept"}
    out = {"removed_layers": [], "blocks": records, "bias_compensation": plan["bias"]}
    if not plan["heads_ok"]:
        out["heads_kept"] = walk.adapter.head_pruning_refusal(walk.model.config)
    if walk.cfg.flap_bias and not plan["bias"]:
        out["note"] = "bias compensation skipped: this architecture has no bias flags for o_proj/down_proj"
    return out


register(Method("flap", step, FlapOptions, plan=plan, prepare=prepare, details=details, desc="FLAP",
                plan_budget=plan_neurons_only, streams=False,
                help="FLAP: fluctuation, one global ranking, bias compensation"))
