"""Architecture adapters and comprune's per-layer-width model classes (registered on import)."""
from .adapters import ADAPTERS, MLPParts, base_model_type, get_adapter  # noqa: F401
from .modeling_comprune import CONFIGS, MODEL_NAMES, model_class, register  # noqa: F401
from .saved import per_layer_config  # noqa: F401

register()
