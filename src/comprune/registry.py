"""The method registry: one frozen record per pruning method, read by the config, the CLI, streaming and compare.

A method is a plug-in: a per-block step (and optionally a plan, its dense analysis), a dataclass of its own
typed options (with help text and choices in each field's metadata, and a `validate(cfg)` of its own), and
declared capabilities. It is added with one call,

    register(Method("my-method", step, MyOptions, plan=plan, help="..."))

usually at the bottom of the module that defines it. Methods outside this package are found through the
`comprune.methods` entry-point group, or the comma-separated modules named in $COMPRUNE_PLUGINS, imported on
the first lookup."""
from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from typing import Callable

from .errors import CompruneError


@dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none of its own."""

    def validate(self, cfg) -> None:
        pass


@dataclass(frozen=True)
class Method:
    """A pruning method as the block walk (comprune.sequential.walk_blocks) runs it: an optional plan (its dense
    analysis, before any block changes), a step per block, and what it reports."""
    name: str
    step: Callable                      # step(walk, i, layer, acts, plan, carry) -> (block record, next acts)
    options: type = NoOptions           # frozen dataclass of the method's own settings
    help: str = ""
    plan: Callable | None = None        # plan(walk, acts) -> (JSON plan, block-0 acts): "removed_layers", ...
    prepare: Callable | None = None     # prepare(walk, plan): model-wide changes before the steps (and a replay)
    details: Callable | None = None     # details(walk, plan, records) -> report details; default: plan's removed
                                        # layers and the records
    pack: Callable | None = None        # pack(walk, acts) / unpack(walk, saved): a step's activations that are
    unpack: Callable | None = None      # not one Activations (a second stream), as a checkpoint holds them
    desc: str = ""                      # progress label (default: the name)
    plan_budget: Callable | None = None  # (model, adapter, cfg) -> Budget; None: the hybrid layers + neurons plan
    needs_gradients: bool = False       # runs backward passes: no forward capture, autograd on
    resumable: bool = True              # a killed run continues from its checkpoint with --resume
    streams: bool = True                # touches block weights only while the walk holds them resident
    uses_fitness: bool = False          # scores candidates on held-apart windows of the calibration source
    splits_budget: bool = False         # reads --layer-share / --head-share / --expert-share


_METHODS: dict[str, Method] = {}
_discovered = False


def register(method: Method) -> Method:
    if not dataclasses.is_dataclass(method.options):
        raise TypeError(f"method {method.name}: options must be a dataclass")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    _METHODS.pop(name, None)


def _discover() -> None:
    """The built-in methods, then plug-ins (entry points and $COMPRUNE_PLUGINS), once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    importlib.import_module("comprune.methods")  # the built-ins register themselves on import
    try:
        from importlib.metadata import entry_points
        for ep in entry_points(group="comprune.methods"):
            ep.load()
    except Exception as e:  # noqa: BLE001 - a broken third-party plug-in must not hide the built-ins
        raise CompruneError(f"a comprune.methods entry point failed to load ({e}): fix or uninstall that "
                            "package") from None
    for mod in filter(None, (m.strip() for m in os.environ.get("COMPRUNE_PLUGINS", "").split(","))):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise CompruneError(f"COMPRUNE_PLUGINS names '{mod}', which cannot be imported ({e}): fix the "
                                "module path or unset COMPRUNE_PLUGINS") from None


def methods() -> dict[str, Method]:
    _discover()
    return dict(_METHODS)


def names() -> tuple[str, ...]:
    return tuple(methods())


def get(name: str) -> Method:
    found = methods().get(name)
    if found is None:
        raise CompruneError(f"unknown method '{name}': use one of {', '.join(names())}")
    return found


def option_fields(options: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(options))


def owners(option: str) -> list[str]:
    """The methods declaring an option of this name."""
    return [m.name for m in methods().values() if option in {f.name for f in dataclasses.fields(m.options)}]
