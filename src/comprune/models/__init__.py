"""Architecture adapters, the family records, and comprune's per-layer-width model classes (registered on import)."""
from .adapters import MLPParts, base_model_type, get_adapter  # noqa: F401
from .families import FAMILIES, Family, family_of, register_family, unregister_family  # noqa: F401
from .modeling_comprune import CONFIGS, MODEL_NAMES, model_class, register  # noqa: F401
from .saved import per_layer_config  # noqa: F401
