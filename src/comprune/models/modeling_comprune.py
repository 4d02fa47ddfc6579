# Copyright comprune authors. Licensed under the Apache License, Version 2.0.
"""Decoder models whose MLP width differs per layer, as left by structured pruning.

Self-contained on purpose: comprune copies this file next to every non-uniform pruned model and points
`auto_map` at it, so stock transformers loads the model with `trust_remote_code=True`; `import comprune`
registers the same classes so no remote code is needed at all.

The config is the base architecture's own config plus `intermediate_sizes` (one MLP width per layer,
0 = MLP removed) and `comprune_base_model_type`; when attention heads were pruned unevenly, also
`num_attention_heads_per_layer` and `num_key_value_heads_per_layer` (query and KV heads of each layer;
`head_dim` is then explicit in the config).
"""
import copy

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM


def narrow_mlps(layers, config):
    """Rebuild each layer's MLP at its own width (the base classes read one global intermediate_size)."""
    sizes = getattr(config, "intermediate_sizes", None)
    if sizes is None:
        return
    if len(sizes) != len(layers):
        raise ValueError(f"intermediate_sizes has {len(sizes)} entries for {len(layers)} layers")
    for layer, width in zip(layers, sizes):
        if width == config.intermediate_size:
            continue
        sub = copy.copy(config)
        sub.intermediate_size = int(width)
        layer.mlp = type(layer.mlp)(sub)


def narrow_attention(layers, config):
    """Rebuild each layer's attention with its own query/KV head counts (GQA groups pruned per layer)."""
    heads = getattr(config, "num_attention_heads_per_layer", None)
    kv_heads = getattr(config, "num_key_value_heads_per_layer", None)
    if heads is None and kv_heads is None:
        return
    heads = heads or [config.num_attention_heads] * len(layers)
    kv_heads = kv_heads or [config.num_key_value_heads] * len(layers)
    if len(heads) != len(layers) or len(kv_heads) != len(layers):
        raise ValueError(f"per-layer head counts have {len(heads)}/{len(kv_heads)} entries for {len(layers)} layers")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for i, (layer, h, kv) in enumerate(zip(layers, heads, kv_heads)):
        if h == config.num_attention_heads and kv == config.num_key_value_heads:
            continue
        sub = copy.copy(config)
        sub.num_attention_heads, sub.num_key_value_heads, sub.head_dim = int(h), int(kv), int(head_dim)
        attn = type(layer.self_attn)(sub, getattr(layer.self_attn, "layer_idx", i))
        attn.config = config  # geometry lives in the weights; the shared config keeps the attention backend
        layer.self_attn = attn


def _make(base_config, base_model, base_type):
    model_type = f"comprune_{base_type}"
    config_cls = type(f"Comprune{base_config.__name__}", (base_config,), {"model_type": model_type})

    def __init__(self, config):
        base_model.__init__(self, config)
        narrow_mlps(self.model.layers, config)
        narrow_attention(self.model.layers, config)
        self.post_init()

    model_cls = type(f"Comprune{base_model.__name__}", (base_model,),
                     {"config_class": config_cls, "__init__": __init__, "__module__": __name__})
    config_cls.__module__ = __name__
    return config_cls, model_cls


CompruneLlamaConfig, CompruneLlamaForCausalLM = _make(LlamaConfig, LlamaForCausalLM, "llama")
CompruneMistralConfig, CompruneMistralForCausalLM = _make(MistralConfig, MistralForCausalLM, "mistral")
CompruneQwen2Config, CompruneQwen2ForCausalLM = _make(Qwen2Config, Qwen2ForCausalLM, "qwen2")

CLASSES = {
    "llama": (CompruneLlamaConfig, CompruneLlamaForCausalLM),
    "mistral": (CompruneMistralConfig, CompruneMistralForCausalLM),
    "qwen2": (CompruneQwen2Config, CompruneQwen2ForCausalLM),
}


def register():
    for config_cls, model_cls in CLASSES.values():
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:  # already registered
            pass
