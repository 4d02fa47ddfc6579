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
`head_dim` is then explicit in the config). config.json also holds the same shapes as transformers 5's
`per_layer_config` (layer index -> the attributes that differ from the global ones), which stock configs, vLLM's
Transformers backend and NVIDIA's AnyModel read, wherever the base config class accepts them (see
`stock_overrides`). The config class answers `is_heterogeneous` and `per_layer_config[i]` from its lists (so its
global values, the largest layer's, stay readable), and fills lists it lacks from a `per_layer_config`.
`auto_map["AutoModel"]` names the base model (CompruneLlamaModel, ...) that vLLM builds under its own LM head.

Which families it defines is data given to `add_family`: comprune calls it for every family it knows
(models/families.py), and the copy saved next to a model ends with the call for that model's family.

The model classes (CompruneLlamaForCausalLM, ...) are built on first access (module `__getattr__`): the
configs alone do not import transformers' modeling code, which costs ~130 MB of memory that a streamed
prune should not pay.
"""
import copy
import importlib

import torch.nn as nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

# base model type -> (dotted paths of the transformers config and model classes, the config key of the MLP width):
# filled by add_family (comprune registers every family it knows; a copy saved next to a model names its own)
FAMILIES = {}
CONFIGS = {}
MODEL_NAMES = {}
_built = {}
_built_base = {}


def _width_key(config) -> str:
    return FAMILIES[config.model_type.removeprefix("comprune_")][2]


def decoder_layers(model):
    inner = model.model if isinstance(getattr(model, "model", None), nn.Module) else model  # a ForCausalLM or its base
    return inner.decoder.layers if hasattr(inner, "decoder") else inner.layers


# comprune's per-layer lists and the attribute each holds per layer in transformers' `per_layer_config`
_HEAD_LISTS = (("num_attention_heads_per_layer", "num_attention_heads"),
               ("num_key_value_heads_per_layer", "num_key_value_heads"))


def _layer_lists(config) -> dict:
    """{attribute: one value per layer} for the per-layer attributes the config holds lists of."""
    d = config.__dict__
    lists = {}
    if d.get("intermediate_sizes") is not None:
        lists[_width_key(config)] = list(d["intermediate_sizes"])
    for name, attr in _HEAD_LISTS:
        if d.get(name) is not None:
            lists[attr] = list(d[name])
    return lists


def layer_overrides(config) -> dict:
    """transformers' `per_layer_config` of the lists: {zero-padded layer index: {attribute: value}} for the layers
    and attributes that differ from the global value, as transformers serializes it."""
    per_layer = {}
    for attr, values in _layer_lists(config).items():
        for i, value in enumerate(values):
            if value != config.__dict__.get(attr):
                per_layer.setdefault(i, {})[attr] = int(value)
    digits = len(str(max(per_layer))) if per_layer else 1
    return {str(i).zfill(digits): per_layer[i] for i in sorted(per_layer)}


def _is_heterogeneous(self) -> bool:
    return bool(layer_overrides(self))


def _per_layer_config(self):
    """One config per layer (a copy with that layer's width and heads, and no lists), as transformers' view."""
    overrides = {int(i): o for i, o in layer_overrides(self).items()}
    layers = []
    for i in range(self.num_hidden_layers):
        layer = copy.copy(self)  # a new __dict__: the lists go from the copy only
        for name in ("intermediate_sizes", *(n for n, _ in _HEAD_LISTS)):
            layer.__dict__.pop(name, None)
        for attr, value in overrides.get(i, {}).items():
            setattr(layer, attr, value)
        layers.append(layer)
    return layers


def _set_per_layer_config(self, per_layer):
    """Read transformers' `per_layer_config` (another tool's config.json) into the lists the config lacks, the
    global values filling in the attributes a layer does not override. Lists already given win: they are what
    comprune wrote (and a config rebuilt from an older config's to_dict may carry a stale per_layer_config)."""
    if per_layer is None:
        return
    per_layer = {int(i): dict(o) for i, o in dict(per_layer).items()}
    n = self.num_hidden_layers
    width_key = _width_key(self)
    names = {width_key: "intermediate_sizes", **{attr: name for name, attr in _HEAD_LISTS}}
    unknown = {a for o in per_layer.values() for a in o} - set(names)
    if unknown or any(not 0 <= i < n for i in per_layer):
        raise ValueError(f"per_layer_config holds {sorted(unknown) or 'layers'} that comprune's per-layer "
                         f"classes do not build (widths {width_key} and head counts of {n} layers)")
    for attr, name in names.items():
        if self.__dict__.get(name) is None and (attr == width_key or any(attr in o for o in per_layer.values())):
            glob = self.__dict__.get(attr)
            setattr(self, name, [int(per_layer.get(i, {}).get(attr, glob)) for i in range(n)])


def stock_overrides(config, config_dict: dict) -> dict:
    """`layer_overrides`, as written into config.json: only when the base architecture's own config class accepts
    them (transformers 5's Llama config checks hidden_size % num_attention_heads on the global value, so a model
    whose query heads vary per layer keeps them in comprune's lists and config class only: a config.json that
    stock AutoConfig, and so stock AutoTokenizer, cannot read would be worse than none)."""
    overrides = layer_overrides(config)
    base_config = _import(FAMILIES[config.model_type.removeprefix("comprune_")][0])
    if not overrides or not hasattr(base_config, "is_heterogeneous"):  # transformers before 5's schema
        return {}
    plain = {k: v for k, v in config_dict.items()
             if k not in ("model_type", "transformers_version", "auto_map", "architectures", "per_layer_config")}
    try:
        base_config(**plain, per_layer_config=overrides)
    except Exception:
        return {}
    return overrides


def _to_dict_output(self, d: dict) -> None:
    # the per-layer shapes in transformers' own schema beside comprune's lists (kept: older readers use them)
    if self.is_heterogeneous and (overrides := stock_overrides(self, d)):
        d["per_layer_config"] = overrides


def narrow_mlps(layers, config):
    """Rebuild each layer's MLP at its own width (the base classes read one global intermediate_size)."""
    sizes = getattr(config, "intermediate_sizes", None)
    if sizes is None:
        return
    if len(sizes) != len(layers):
        raise ValueError(f"intermediate_sizes has {len(sizes)} entries for {len(layers)} layers")
    key = _width_key(config)
    for layer, width in zip(layers, sizes):
        if width == getattr(config, key):
            continue
        if hasattr(layer, "fc1"):  # OPT: the block holds its MLP's two linears itself
            bias = layer.fc1.bias is not None
            layer.fc1 = nn.Linear(layer.fc1.in_features, int(width), bias=bias)
            layer.fc2 = nn.Linear(int(width), layer.fc2.out_features, bias=bias)
            continue
        sub = copy.copy(config)
        setattr(sub, key, int(width))
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
        if not hasattr(attn, "qkv_proj"):  # Phi-3 splits its fused qkv at config.num_attention_heads: keeps `sub`
            attn.config = config  # geometry lives in the weights; the shared config keeps the attention backend
        layer.self_attn = attn


def validate_architecture(self):
    """The base check (hidden_size % num_attention_heads == 0) predates explicit head_dim; pruned heads break
    it while the geometry stays well defined: only q/o widths built from head_dim must be whole."""
    if not getattr(self, "head_dim", None) and self.hidden_size % self.num_attention_heads != 0:
        raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                         f"{self.num_attention_heads} and head_dim is not given")


def _import(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _config(base_type):
    base_config = _import(FAMILIES[base_type][0])
    model_type = f"comprune_{base_type}"

    def get_config_dict(cls, *args, **kwargs):
        # config.json names the base model_type, so that stock AutoConfig/AutoTokenizer read it without remote
        # code; loaded through this class, the config is the per-layer one again
        config_dict, rest = base_config.get_config_dict.__func__(cls, *args, **kwargs)
        return {**config_dict, "model_type": model_type}, rest

    cls = type(f"Comprune{base_config.__name__}", (base_config,),
               {"model_type": model_type, "get_config_dict": classmethod(get_config_dict),
                "validate_architecture": validate_architecture, "validate": _validate,
                # transformers 5's heterogeneous-config interface, answered from the lists (see the module doc)
                "is_heterogeneous": property(_is_heterogeneous),
                "per_layer_config": property(_per_layer_config, _set_per_layer_config),
                "per_layer_attributes": property(lambda self: {a for o in layer_overrides(self).values() for a in o}
                                                 or None),
                "_iter_config_keys_with_heterogeneous_adjustment": lambda self, keys: iter(keys),
                "_update_heterogeneous_to_dict_output": _to_dict_output})
    # huggingface_hub's strict dataclasses list a class's validators when the base is decorated: list ours
    cls.__class_validators__ = [getattr(cls, name) for name in dir(cls)
                                if name.startswith("validate_") and callable(getattr(cls, name))]
    cls.__module__ = __name__
    return cls


def _validate(self):
    for validator in type(self).__class_validators__:
        validator(self)


def add_family(base_type: str, config_class: str, model_class: str, width_key: str = "intermediate_size"):
    """Define comprune's per-layer-width classes of a family (the model class is built on first use)."""
    FAMILIES[base_type] = (config_class, model_class, width_key)
    CONFIGS[base_type] = config_cls = _config(base_type)
    MODEL_NAMES[base_type] = f"Comprune{model_class.rpartition('.')[2]}"
    _built.pop(base_type, None)
    _built_base.pop(base_type, None)
    globals()[config_cls.__name__] = config_cls  # auto_map names them: modeling_comprune.<Config>


def remove_family(base_type: str) -> None:
    """Forget a family added by add_family, here and in transformers' Auto registries."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING
    config_cls = CONFIGS.pop(base_type)
    for table in (FAMILIES, MODEL_NAMES, _built, _built_base):
        table.pop(base_type, None)
    globals().pop(config_cls.__name__, None)
    CONFIG_MAPPING._extra_content.pop(config_cls.model_type, None)
    MODEL_FOR_CAUSAL_LM_MAPPING._extra_content.pop(config_cls, None)
    MODEL_MAPPING._extra_content.pop(config_cls, None)


def _narrowed(base_model, name, base_type):
    """`base_model` (a transformers class) whose layers are rebuilt at their own widths and head counts."""
    def __init__(self, config):
        base_model.__init__(self, config)
        narrow_mlps(decoder_layers(self), config)
        narrow_attention(decoder_layers(self), config)
        self.post_init()

    return type(name, (base_model,), {"config_class": CONFIGS[base_type], "__init__": __init__, "__module__": __name__})


def _make_model(base_type):
    return _narrowed(_import(FAMILIES[base_type][1]), MODEL_NAMES[base_type], base_type)


def _make_base(base_type):
    """The base model (no LM head) that `auto_map["AutoModel"]` names: what vLLM's Transformers backend builds."""
    base_config = _import(FAMILIES[base_type][0])
    return _narrowed(AutoModel._model_mapping[base_config], base_model_name(base_type), base_type)


def base_model_name(base_type: str) -> str:
    return MODEL_NAMES[base_type].replace("ForCausalLM", "Model")


def model_class(base_type):
    """The per-layer-width model class of a base family (built, and registered with AutoModelForCausalLM, on
    first use)."""
    if base_type not in _built:
        _built[base_type] = _make_model(base_type)
        AutoModelForCausalLM.register(CONFIGS[base_type], _built[base_type], exist_ok=True)
    return _built[base_type]


def base_class(base_type):
    """The per-layer-width base model class of a family (built, and registered with AutoModel, on first use)."""
    if base_type not in _built_base:
        _built_base[base_type] = _make_base(base_type)
        AutoModel.register(CONFIGS[base_type], _built_base[base_type], exist_ok=True)
    return _built_base[base_type]


def __getattr__(name):
    for base_type, model_name in MODEL_NAMES.items():
        if name == model_name:
            return model_class(base_type)
        if name == base_model_name(base_type):
            return base_class(base_type)
    if name == "CLASSES":
        return {t: (CONFIGS[t], model_class(t)) for t in CONFIGS}
    raise AttributeError(f"module {__name__} has no attribute {name}")


def _deferred(base_type, build=model_class, name=None):
    """A stand-in for the model class in AutoModelForCausalLM's (or AutoModel's) registry: the first
    from_pretrained/from_config builds the real class (which then replaces it in the registry) and hands over."""
    def from_pretrained(cls, *args, **kwargs):
        return build(base_type).from_pretrained(*args, **kwargs)

    def _from_config(cls, *args, **kwargs):
        return build(base_type)._from_config(*args, **kwargs)

    return type(name or MODEL_NAMES[base_type], (), {"config_class": CONFIGS[base_type], "__module__": __name__,
                                             "from_pretrained": classmethod(from_pretrained),
                                             "_from_config": classmethod(_from_config)})


def saved_config_class(config_dict: dict):
    """The per-layer config class a saved config.json is for (its base `model_type` plus `intermediate_sizes`),
    or None for any other config."""
    base_type = str(config_dict.get("model_type", "")).removeprefix("comprune_")
    if "intermediate_sizes" in config_dict and base_type in CONFIGS:
        return CONFIGS[base_type]
    return None


def register(base_type: str | None = None):
    """Make the per-layer classes of one family (default: all added) known to transformers' Auto factories."""
    for t, config_cls in CONFIGS.items():
        if base_type not in (None, t):
            continue
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
        except ValueError:  # already registered
            pass
        AutoModelForCausalLM.register(config_cls, _built.get(t) or _deferred(t), exist_ok=True)
        AutoModel.register(config_cls, _built_base.get(t) or _deferred(t, base_class, base_model_name(t)),
                           exist_ok=True)
