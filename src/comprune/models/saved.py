"""The config of a saved model directory as comprune loads it: comprune's per-layer outputs name their base
`model_type` in config.json (so stock tokenizers need no remote code, see modeling_comprune), and get the
per-layer config class back here; every other directory is left to transformers' AutoConfig."""
from __future__ import annotations

from pathlib import Path

from ..files import read_config
from .modeling_comprune import saved_config_class


def per_layer_config(model_dir, config_dict: dict | None = None):
    """comprune's per-layer config of `model_dir`, or None when it is not a per-layer output."""
    cls = saved_config_class(config_dict if config_dict is not None else read_config(model_dir))
    return cls.from_pretrained(Path(model_dir)) if cls is not None else None
