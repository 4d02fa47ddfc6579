"""Pruning methods, each registered with comprune.registry at the bottom of its module.

A method's run function is `run(model, adapter, acts, input_ids, cfg, budget, show, **kw) -> dict` with at least
`removed_layers` (original indices) and `blocks` ({original layer index: {"width", "kept_neurons", ...}}); prune()
drops the removed blocks and rewrites the config afterwards. Its record (comprune.registry.Method) declares its
options and capabilities."""
from . import baselines, comp  # noqa: F401  (register the built-in methods)
from ..registry import methods


def __getattr__(name):
    if name == "METHODS":  # {name: run function}, as older callers read it
        return {n: m.run for n, m in methods().items()}
    raise AttributeError(name)
