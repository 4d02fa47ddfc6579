"""The parameter budget: how a ratio of a model's parameters splits into whole blocks, attention heads, experts
and MLP neurons. Pure functions of the model's shapes and the configuration, which they only read: a caller
trying another ratio (a bisection, a target) passes it as `ratio` instead of changing the configuration."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import CompruneError
from ..loading import count_params
from ..surgery import attention_parts, check_head_pruning


@dataclass
class Budget:
    params_total: int
    params_to_remove: int
    n_layers: int
    block_params: int
    layers_to_remove: int
    neurons_per_layer: int          # neurons removed from every kept block's MLP
    params_per_neuron: int
    kv_groups_per_layer: int = 0    # COMP's head option: KV groups (with their query heads) removed per kept block
    params_per_kv_group: int = 0
    query_heads_per_group: int = 0  # COMP's head option, query unit: query heads removed from every KV group
    params_per_query_head: int = 0
    experts_per_layer: int = 0      # mixture-of-experts: experts removed per kept block (neurons_per_layer is then
    params_per_expert: int = 0      # the count removed from every kept expert)
    quantum_params: int = 0         # parameters of the smallest width step the plan can take (0: one neuron per block)

    def to_dict(self):
        return dict(self.__dict__)


def params_per_neuron(adapter, layer) -> int:
    parts = adapter.mlp(layer)
    n = parts.up.in_features + parts.down.out_features
    n += parts.up.bias is not None
    if parts.gate is not None:
        n += parts.gate.in_features + (parts.gate.bias is not None)
    return n


def block_params(model, adapter) -> int:
    """Parameters of the decoder blocks (what every method prunes: no embeddings, final norm or LM head)."""
    seen, n = set(), 0
    for layer in adapter.layers(model):
        for p in layer.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def budget_base(model, adapter, cfg) -> int:
    """What `ratio` is a fraction of: all parameters, or the blocks' alone (cfg.ratio_of)."""
    return block_params(model, adapter) if cfg.ratio_of == "blocks" else count_params(model)


def _embedding_hint(model, adapter, cfg) -> str:
    if cfg.ratio_of == "blocks":
        return ""
    share = 1 - block_params(model, adapter) / max(count_params(model), 1)
    return (f"; {share:.0%} of this model's parameters are embeddings/LM head, which no method prunes: "
            "--ratio-of blocks budgets over the blocks alone") if share > 0.2 else ""


def _check_reachable(model, adapter, cfg, ratio: float, target: float):
    blocks = block_params(model, adapter)
    if target >= blocks:
        raise CompruneError(f"--ratio {ratio} of {'the blocks' if cfg.ratio_of == 'blocks' else 'all'} parameters "
                            f"is {target:,.0f} but the blocks hold only {blocks:,}: lower --ratio"
                            + _embedding_hint(model, adapter, cfg))


def plan_budget(model, adapter, cfg, layer_share: float | None = None, expert_share: float | None = None,
                ratio: float | None = None) -> Budget:
    """Split `ratio` (default cfg.ratio) of all (or the blocks') parameters between whole blocks (floor of
    layer_share) and MLP neurons (the rest), so the achieved ratio lands within one neuron per layer (or one width
    quantum) of the request."""
    ratio = cfg.ratio if ratio is None else ratio
    share = cfg.layer_share if layer_share is None else layer_share
    layers = adapter.layers(model)
    L = len(layers)
    total = count_params(model)
    target = ratio * budget_base(model, adapter, cfg)
    if cfg.head_share > 0:
        check_head_pruning(adapter, model.config)
    block = sum(p.numel() for p in layers[0].parameters())
    k = int(math.floor(share * target / block + 1e-9))
    removable = L - cfg.protect_first - cfg.protect_last
    if k > removable:
        raise CompruneError(f"the budget asks to remove {k} of {L} layers but only {max(removable, 0)} may go "
                            f"(first {cfg.protect_first} and last {cfg.protect_last} are protected): "
                            "lower --ratio or --layer-share")
    _check_reachable(model, adapter, cfg, ratio, target)
    per = params_per_neuron(adapter, layers[0]) if not getattr(adapter, "moe", False) else 0
    rest = target - k * block
    kept = L - k
    groups, group_params, qheads, qhead_params = 0, 0, 0, 0
    if cfg.head_share > 0 and kept and cfg.head_unit == "kv":
        attn = attention_parts(adapter, layers[0])
        group_params = attn.group_params()
        groups = int(round(cfg.head_share * rest / kept / group_params))
        if groups >= attn.n_kv:
            raise CompruneError(f"--head-share {cfg.head_share} asks for {groups} of {attn.n_kv} KV groups per block: "
                                "every block must keep one; lower --head-share")
        rest -= groups * kept * group_params
    elif cfg.head_share > 0 and kept:
        attn = attention_parts(adapter, layers[0])
        qhead_params = attn.query_head_params()
        qheads = int(round(cfg.head_share * rest / kept / (qhead_params * attn.n_kv)))
        if qheads >= attn.rep:
            raise CompruneError(f"--head-share {cfg.head_share} asks for {qheads} of the {attn.rep} query heads of every "
                                "KV group: each group must keep one; lower --head-share")
        rest -= qheads * attn.n_kv * kept * qhead_params
    if getattr(adapter, "moe", False):
        share_e = cfg.expert_share if expert_share is None else expert_share
        return _moe_budget(adapter, layers, cfg, ratio, share_e, rest, kept, Budget(
            total, int(round(target)), L, block, k, 0, 0, groups, group_params, qheads, qhead_params))
    n = int(round(rest / per / kept)) if kept else 0
    widths = [adapter.mlp(layer).down.in_features for layer in layers]
    if n > min(widths) - cfg.min_width:
        raise CompruneError(f"ratio {ratio} needs {n} neurons removed per MLP but layers have only "
                            f"{min(widths)}: raise --layer-share (remove whole layers) or lower --ratio"
                            + _embedding_hint(model, adapter, cfg))
    # widths rounded to round_to (fast kernels, the export's step) step by round_to neurons in every kept block
    quantum = cfg.round_to * per * kept if cfg.round_to > 1 else 0
    return Budget(total, int(round(target)), L, block, k, n, per, groups, group_params, qheads, qhead_params,
                  quantum_params=quantum)


MOE_WIDTH_MULTIPLE = 8


def _moe_budget(adapter, layers, cfg, ratio: float, expert_share: float, rest: float, kept: int, budget: Budget) -> Budget:
    """The MLP part of the budget on mixture-of-experts blocks: expert_share of it by whole experts (with their
    router rows), the rest by as many neurons from every kept expert, the same in every kept block."""
    lst, router = adapter.experts(layers[0]), adapter.router(layers[0])
    n_exp, width, top_k = lst.num_experts, lst.width, int(getattr(router, "top_k", 1))
    ex = lst.experts[0]
    per_neuron = ex.gate_proj.in_features + ex.up_proj.in_features + ex.down_proj.out_features
    per_expert = sum(p.numel() for p in ex.parameters()) + router.weight.shape[1]
    e = int(round(expert_share * rest / kept / per_expert)) if kept else 0
    if e > n_exp - top_k:
        raise CompruneError(f"the budget asks to remove {e} of {n_exp} experts per block but every token is routed "
                            f"to {top_k}: lower --ratio or --expert-share")
    rest -= e * kept * per_expert
    # transformers' grouped experts kernel needs 16-byte row strides: expert widths stay multiples of 8
    q = math.lcm(MOE_WIDTH_MULTIPLE, cfg.round_to)
    n = width - q * int(round((width - rest / kept / ((n_exp - e) * per_neuron)) / q)) if kept else 0
    if n > width - max(cfg.min_width, 1):
        raise CompruneError(f"ratio {ratio} needs {n} of the {width} neurons of every expert removed: raise "
                            "--expert-share (remove whole experts) or --layer-share, or lower --ratio")
    budget.neurons_per_layer, budget.params_per_neuron = n, (n_exp - e) * per_neuron
    budget.experts_per_layer, budget.params_per_expert = e, per_expert
    budget.quantum_params = q * (n_exp - e) * per_neuron * kept
    return budget


def kept_width(width: int, n_remove: int, round_to: int, min_width: int = 0) -> int:
    """Width after removing n_remove neurons, rounded to the nearest multiple of round_to (fast kernels)."""
    w = width - n_remove
    if round_to > 1:
        w = int(round(w / round_to) * round_to)
    return max(min(w, width), min_width, 0)


def plan_neurons_only(model, adapter, cfg, ratio: float | None = None) -> Budget:
    """Budget of the neuron-only baselines (wanda-sp, magnitude, flap, llm-pruner): no whole layers (and on
    mixture-of-experts blocks no whole experts: neurons inside every expert)."""
    return plan_budget(model, adapter, cfg, layer_share=0.0, expert_share=0.0, ratio=ratio)


def plan_layers_only(model, adapter, cfg, ratio: float | None = None) -> Budget:
    """Budget of layer removal alone (ShortGPT): k = round(ratio * params / block params) whole blocks. The
    achieved ratio is then a multiple of one block's share, which can be far from the request: it is reported."""
    layers = adapter.layers(model)
    L = len(layers)
    total = count_params(model)
    ratio = cfg.ratio if ratio is None else ratio
    target = ratio * budget_base(model, adapter, cfg)
    block = sum(p.numel() for p in layers[0].parameters())
    k = max(1, int(round(target / block)))
    removable = L - cfg.protect_first - cfg.protect_last
    if k > removable:
        raise CompruneError(f"ratio {ratio} needs {k} of {L} layers removed but only {max(removable, 0)} may go "
                            f"(first {cfg.protect_first} and last {cfg.protect_last} are protected): lower --ratio"
                            + _embedding_hint(model, adapter, cfg))
    per = 0 if getattr(adapter, "moe", False) else params_per_neuron(adapter, layers[0])
    return Budget(total, int(round(target)), L, block, k, 0, per)
