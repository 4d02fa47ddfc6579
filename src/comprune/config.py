"""Pruning configuration: the run and budget settings every method shares, and the chosen method's own options.

A config is validated when it is made and frozen: nothing writes it afterwards (`dataclasses.replace` makes a
changed copy, validated again). Method options may be given flat (`PruneConfig(ratio=0.2, metric="obs")`, or as
`extra={...}`): each goes to the field of that name in the method's options dataclass (comprune.registry), and an
option the chosen method does not declare is refused, naming the methods that do. They read as attributes of
the config too (`cfg.metric` is `cfg.options.metric`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields

from . import registry
from .errors import CompruneError

# Named starting points; explicit arguments override them. "comp-spec" is the literal reading of docs/method.md
# before the ablations moved the defaults (condition score, per-neuron scales, 128 x 128 calibration), kept so
# the paper's reading stays comparable.
PRESETS = {
    # Widths searched against the whole model's KL (docs/ablation.md: ~5 % lower held-out perplexity than uniform
    # widths at 20 %, at several times the pruning time).
    "comp-search": dict(method="comp", width_allocation="search", search_generations=80),
    "comp-spec": dict(method="comp", metric="condition", recovery="scales", target_mix=0.0, layer_compensation=False,
                      head_share=0.0, nsamples=128, seqlen=128, layer_share=0.25, damp=0.01, token_weight="none"),
}


@dataclass(frozen=True, init=False)
class PruneConfig:
    ratio: float = 0.2                 # fraction of all parameters to remove (embeddings included, tied once)
    ratio_of: str = "all"              # "all" parameters, or "blocks": the decoder blocks' (no embeddings/LM head)
    method: str = "comp"
    # fraction of the removed parameters taken by whole layers; 0 (neurons only) won on both held-out sets at
    # 20 % (docs/ablation.md); the hybrid stays one flag away, and --search-layers lets the search choose blocks
    layer_share: float = 0.0
    nsamples: int = 128                # calibration windows
    seqlen: int = 128                  # tokens per calibration window
    calib: str = "c4"                  # calibration source (never the evaluation text)
    seed: int = 0
    device: str = "cpu"                # requested compute device ("cpu", "cuda", "auto"); the model stays where it is
    batch_size: int = 8                # calibration windows per block forward
    protect_first: int = 1             # never remove the first/last blocks
    protect_last: int = 1
    round_to: int = 1                  # kept MLP widths rounded to a multiple of this
    min_width: int = 0                 # never narrow an MLP below this many neurons
    head_share: float = 0.0            # fraction of the non-layer budget taken from attention (0: MLPs only)
    # mixture-of-experts models: fraction of the MLP budget taken by whole experts (the rest: neurons inside the
    # kept experts). A fill-in: no real MoE model is available offline to choose it on validation data
    expert_share: float = 0.5
    head_unit: str = "query"           # what attention loses: "query" heads (as many per KV group) or whole "kv" groups
    search_speedup: float = 0.0        # with `latency`: the searched allocation must be predicted this much faster
                                       # in llama.cpp generation than dense, at the same parameter budget
                                       # (--ratio with --target-speedup; the search then removes whole blocks)
    latency: dict = field(default_factory=dict)  # the latency table's fit (c, a, m) for search_speedup
    options: object = None             # the method's own options (an instance of its registered dataclass)

    def __init__(self, options=None, extra: dict | None = None, **given):
        run_names = {f.name for f in fields(PruneConfig)} - {"options"}
        run = {k: given.pop(k) for k in list(given) if k in run_names}
        method = registry.get(run.get("method", "comp"))
        flat = {**(extra or {}), **given}
        declared = {f.name for f in fields(method.options)}
        for name in flat:
            if name not in declared:
                raise CompruneError(_not_an_option(name, method.name))
        if options is None:
            options = method.options(**flat)
        elif not isinstance(options, method.options):
            raise CompruneError(f"options of type {type(options).__name__} given for method '{method.name}', which "
                                f"takes {method.options.__name__}")
        elif flat:
            options = dataclasses.replace(options, **flat)
        for f in fields(PruneConfig):
            if f.name == "options":
                value = options
            elif f.name in run:
                value = run[f.name]
            else:
                value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            object.__setattr__(self, f.name, value)
        self._check()

    def __getattr__(self, name):
        # only called when normal lookup fails: a method option read through the config
        if name.startswith("__") or name == "options":
            raise AttributeError(name)
        try:
            return getattr(object.__getattribute__(self, "options"), name)
        except AttributeError:
            raise AttributeError(f"PruneConfig for method '{object.__getattribute__(self, 'method')}' has no "
                                 f"setting '{name}'") from None

    def _check(self):
        for name in ("ratio", "layer_share", "head_share", "expert_share", "search_speedup"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise CompruneError(f"{name} must be a finite number (got {value}): "
                                    f"--{name.replace('_', '-')} takes e.g. {getattr(PruneConfig, name)}")
        if not 0 < self.ratio <= 0.9:
            raise CompruneError(f"ratio must be in (0, 0.9] (got {self.ratio}): e.g. --ratio 0.2 removes 20% of parameters")
        if not 0 <= self.layer_share <= 1:
            raise CompruneError(f"layer_share must be in [0, 1] (got {self.layer_share})")
        if self.ratio_of not in ("all", "blocks"):
            raise CompruneError(f"unknown --ratio-of '{self.ratio_of}': use all or blocks")
        if not 0 <= self.head_share < 1:
            raise CompruneError(f"head_share must be in [0, 1) (got {self.head_share})")
        method = registry.get(self.method)
        if self.head_share and not method.splits_budget:
            raise CompruneError(f"--head-share is an option of {' and '.join(_splitters())}; {self.method} plans its "
                                f"own budget: drop it or use --method {_splitters()[0]}")
        if not 0 <= self.expert_share <= 1:
            raise CompruneError(f"expert_share must be in [0, 1] (got {self.expert_share})")
        if self.head_unit not in ("query", "kv"):
            raise CompruneError(f"unknown head unit '{self.head_unit}': use query or kv")
        if self.seqlen <= 1:
            raise CompruneError(f"seqlen must be > 1 (got {self.seqlen})")
        if self.nsamples < 1 or self.batch_size < 1 or self.round_to < 1:
            raise CompruneError("nsamples, batch_size and round_to must be >= 1")
        if self.search_speedup and not (getattr(self.options, "width_allocation", None) == "search" and self.latency):
            raise CompruneError("a speedup with a ratio is a constraint of the width search: use --preset comp-search "
                                "with --ratio and --target-speedup (which measures the latency table)")
        self.options.validate(self)

    def validate(self) -> "PruneConfig":
        """The config, checked (it is checked when made; kept for callers that validate explicitly)."""
        self._check()
        return self

    def replace(self, **changes) -> "PruneConfig":
        """A copy with `changes` (run settings or options), validated."""
        if changes.get("method", self.method) != self.method:  # another method: its own default options
            return PruneConfig(**{**self.run_settings(), **changes})
        return PruneConfig(**{**self.run_settings(), **changes}, options=self.options)

    def run_settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(PruneConfig) if f.name != "options"}

    @property
    def heldout_windows(self) -> int:
        """Calibration-source windows the method holds apart for its fitness (0 when it scores none)."""
        return int(getattr(self.options, "fitness_windows", 0))

    def to_dict(self) -> dict:
        """Flat: the run settings, then the method's options (the shape pruning.json has always had)."""
        return {**self.run_settings(), **asdict(self.options)}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PruneConfig":
        """A preset's settings, then `overrides` on top."""
        if name not in PRESETS:
            raise CompruneError(f"unknown preset '{name}': use one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _run_names() -> set:
    return {f.name for f in fields(PruneConfig)} - {"options"}


def _splitters() -> list[str]:
    return [m.name for m in registry.methods().values() if m.splits_budget] or ["comp"]


def _not_an_option(name: str, method: str) -> str:
    flag = "--" + name.replace("_", "-")
    owners = registry.owners(name)
    if owners:
        return f"{flag} is an option of {', '.join(owners)}, not of {method}: drop it or use --method {owners[0]}"
    return f"unknown setting '{name}' for method {method}: see comprune prune --help"


def finite_duration(value: float, name: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise CompruneError(f"{name} must be a finite number of seconds >= 0 (got {value}): e.g. 1200 or 20m")
    return float(value)
