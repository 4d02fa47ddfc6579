# Copyright comprune authors. Licensed under the Apache License, Version 2.0.
"""Decoder models whose MLP width differs per layer, as left by structured pruning.

Self-contained on purpose: comprune copies this file next to every non-uniform pruned model and points
`auto_map` at it, so stock transformers loads the model with `trust_remote_code=True`; `import comprune`
registers the same classes so no remote code is needed at all. config.json keeps the base `model_type`
(`llama`, ...): stock AutoConfig and AutoTokenizer read it without remote code (no y/N prompt for the
tokenizer), and stock AutoModelForCausalLM without `trust_remote_code` fails on the per-layer shapes instead
of loading a wrong model. In memory the config's model_type is `comprune_<base>`.

The config is the base architecture's own config plus `intermediate_sizes` (one MLP width per layer,
0 = MLP removed); when attention heads were pruned unevenly, also
`num_attention_heads_per_layer` and `num_key_value_heads_per_layer` (query and KV heads of each layer;
`head_dim` is then explicit in the config).

The model classes (CompruneLlamaForCausalLM, ...) are built on first access (module `__getattr__`): the
configs alone do not import transformers' modeling code, which costs ~130 MB of memory that a streamed
prune should not pay.
"""
import copy
import importlib

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config


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


def _config(base_config, base_type):
    model_type = f"comprune_{base_type}"

    def get_config_dict(cls, *args, **kwargs):
        # config.json names the base model_type, so that stock AutoConfig/AutoTokenizer read it without remote
        # code; loaded through this class, the config is the per-layer one again
        config_dict, rest = base_config.get_config_dict.__func__(cls, *args, **kwargs)
        return {**config_dict, "model_type": model_type}, rest

    cls = type(f"Comprune{base_config.__name__}", (base_config,),
               {"model_type": model_type, "get_config_dict": classmethod(get_config_dict)})
    cls.__module__ = __name__
    return cls


CompruneLlamaConfig = _config(LlamaConfig, "llama")
CompruneMistralConfig = _config(MistralConfig, "mistral")
CompruneQwen2Config = _config(Qwen2Config, "qwen2")
CONFIGS = {"llama": CompruneLlamaConfig, "mistral": CompruneMistralConfig, "qwen2": CompruneQwen2Config}
# base model type -> (transformers module, base model class); the class names are Comprune + the base name
BASE_MODELS = {"llama": ("llama", "LlamaForCausalLM"), "mistral": ("mistral", "MistralForCausalLM"),
               "qwen2": ("qwen2", "Qwen2ForCausalLM")}
MODEL_NAMES = {t: f"Comprune{name}" for t, (_, name) in BASE_MODELS.items()}
_built = {}


def _make_model(base_type):
    module, name = BASE_MODELS[base_type]
    base_model = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)

    def __init__(self, config):
        base_model.__init__(self, config)
        narrow_mlps(self.model.layers, config)
        narrow_attention(self.model.layers, config)
        self.post_init()

    return type(MODEL_NAMES[base_type], (base_model,),
                {"config_class": CONFIGS[base_type], "__init__": __init__, "__module__": __name__})


def model_class(base_type):
    """The per-layer-width model class of a base family (built, and registered with AutoModelForCausalLM, on
    first use)."""
    if base_type not in _built:
        _built[base_type] = _make_model(base_type)
        AutoModelForCausalLM.register(CONFIGS[base_type], _built[base_type], exist_ok=True)
    return _built[base_type]


def __getattr__(name):
    for base_type, model_name in MODEL_NAMES.items():
        if name == model_name:
            return model_class(base_type)
    if name == "CLASSES":
        return {t: (CONFIGS[t], model_class(t)) for t in CONFIGS}
    raise AttributeError(f"module {__name__} has no attribute {name}")


def _deferred(base_type):
    """A stand-in for the model class in AutoModelForCausalLM's registry: the first from_pretrained/from_config
    builds the real class (which then replaces it in the registry) and hands over."""
    def from_pretrained(cls, *args, **kwargs):
        return model_class(base_type).from_pretrained(*args, **kwargs)

    def _from_config(cls, *args, **kwargs):
        return model_class(base_type)._from_config(*args, **kwargs)

    return type(MODEL_NAMES[base_type], (), {"config_class": CONFIGS[base_type], "__module__": __name__,
                                             "from_pretrained": classmethod(from_pretrained),
                                             "_from_config": classmethod(_from_config)})


def saved_config_class(config_dict: dict):
    """The per-layer config class a saved config.json is for (its base `model_type` plus `intermediate_sizes`),
    or None for any other config."""
    base_type = str(config_dict.get("model_type", "")).removeprefix("comprune_")
    if "intermediate_sizes" in config_dict and base_type in CONFIGS:
        return CONFIGS[base_type]
    return None


def register():
    for base_type, config_cls in CONFIGS.items():
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
        except ValueError:  # already registered
            pass
        AutoModelForCausalLM.register(config_cls, _built.get(base_type) or _deferred(base_type), exist_ok=True)
