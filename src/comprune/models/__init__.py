"""Architecture adapters and comprune's per-layer-width model classes (registered on import)."""
from .adapters import ADAPTERS, MLPParts, get_adapter, base_model_type  # noqa: F401
from .modeling_comprune import CONFIGS, MODEL_NAMES, model_class, register  # noqa: F401

register()
