"""Which config, and which model class, a pruned model gets.

When every kept layer has the same MLP width and head counts, and the base architecture's config can describe
them, the config is the base architecture's own (stock transformers loads it); otherwise it becomes comprune's
per-layer config (modeling_comprune.py) and the model that class's instance. surgery.py cuts the tensors and
measures the shapes; this module only decides what the config says about them.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import CompruneError
from .adapters import base_model_type
from .lite import CausalLM, class_name
from .families import family_of
from .modeling_comprune import CONFIGS, model_class

# Per-layer config lists that must follow the layers when blocks are dropped.
PER_LAYER_KEYS = ("layer_types", "intermediate_sizes", "num_attention_heads_per_layer",
                  "num_key_value_heads_per_layer")
HEAD_KEYS = ("num_attention_heads_per_layer", "num_key_value_heads_per_layer")


def _replace_config(model, new_cfg):
    old = model.config
    try:  # keep the attention backend the model was built with
        new_cfg._attn_implementation = old._attn_implementation
    except (AttributeError, ValueError):
        pass
    for m in model.modules():
        if getattr(m, "config", None) is old:
            m.config = new_cfg


def stock_config_accepts(cfg_type: str, hidden: int, heads: int) -> bool:
    """Some families' configs (Family.heads_divide_hidden: Llama's, Gemma's) reject hidden_size %
    num_attention_heads != 0 even with an explicit head_dim (the check predates head_dim): such a model needs
    comprune's per-layer config, which checks head_dim instead."""
    return not family_of(cfg_type).heads_divide_hidden or hidden % max(heads, 1) == 0


def write_config(model, adapter, widths: list[int], heads: list[tuple[int, int]]):
    """Record the layers' MLP widths `widths` and (query, KV) head counts `heads` in the config: base config when
    uniform (and the base config can describe it), comprune's per-layer config when not."""
    layers = adapter.layers(model)
    cfg = model.config
    wkey = adapter.width_key
    attn = adapter.attention(layers[0]) if len(layers) else None
    if attn is not None and getattr(attn, "head_dim", None):
        cfg.head_dim = int(attn.head_dim)  # explicit: hidden/heads may no longer hold after pruning
    base_type = base_model_type(cfg)
    heads_uniform = len(set(heads)) <= 1
    fields = {k: v for k, v in cfg.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version", "intermediate_sizes", "auto_map",
                           "per_layer_config",
                           *HEAD_KEYS)}
    if widths:
        fields[wkey] = max(widths) if len(set(widths)) > 1 else widths[0]
    experts_changed = False
    if getattr(adapter, "moe", False):
        counts = [adapter.experts(layer).num_experts for layer in layers]
        if len(set(widths)) > 1 or len(set(counts)) > 1 or not heads_uniform:
            raise CompruneError(f"{base_type}'s config holds one expert count, expert width and head count for all "
                                "layers: every block must keep the same (uniform widths and heads)")
        if counts:  # under the field's own name (Qwen3-MoE maps num_experts to num_local_experts)
            fields[getattr(cfg, "attribute_map", {}).get(adapter.expert_key, adapter.expert_key)] = counts[0]
            experts_changed = getattr(cfg, adapter.expert_key) != counts[0]
    has_kv = hasattr(cfg, "num_key_value_heads")
    if heads:
        # uniform: the layers' geometry; otherwise the largest layer's, each layer's own counts in the lists
        fields["num_attention_heads"], kv = heads[0] if heads_uniform else max(heads)
        if has_kv:
            fields["num_key_value_heads"] = kv
    old_heads = (cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads))
    heads_changed = bool(heads) and old_heads != heads[0]
    uniform = len(set(widths)) <= 1 and heads_uniform and \
        stock_config_accepts(base_type, int(cfg.hidden_size), int(fields.get("num_attention_heads", 1)))
    if uniform:
        if cfg.model_type != base_type or (widths and getattr(cfg, wkey) != widths[0]) or heads_changed \
                or experts_changed:
            new_cfg = AutoConfig.for_model(base_type, **fields)
            _replace_config(model, new_cfg)
            _become(model, lambda: _stock_class(new_cfg))
    else:
        config_cls = CONFIGS[base_type]
        extra = {}
        if not heads_uniform or heads_changed:
            extra = {"num_attention_heads_per_layer": [h for h, _ in heads],
                     "num_key_value_heads_per_layer": [kv for _, kv in heads]}
        new_cfg = config_cls(**fields, intermediate_sizes=widths, **extra)
        _replace_config(model, new_cfg)
        # Same modules, comprune's class: save_pretrained then records the right architecture and config.
        _become(model, lambda: model_class(base_type))


def _stock_class(config):
    return AutoModelForCausalLM._model_mapping[type(config)]


def _become(model, cls):
    """Make `model` an instance of the transformers class for its (new) config. comprune's plain-PyTorch modules
    (models/lite.py, streamed prunes) only record that class's name: their checkpoint is written for it, and
    loading transformers' modeling code would cost the memory streaming saves."""
    if isinstance(model, CausalLM):
        model.architecture = class_name(model.config)
    else:
        model.__class__ = cls()
