"""COMP's own options: what each stage does (layer scores, neuron selection, widths, the search, recovery).

Each field's metadata holds its help text and choices; the CLI makes one option per field from them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import finite_duration
from ..errors import CompruneError

NEURON_METRICS = ("obs", "condition", "kappa-loo", "weighted-norm", "activation", "wanda-sp", "magnitude")
LAYER_SCORES = ("bi", "loss")
WIDTH_ALLOCATIONS = ("uniform", "adaptive", "search")


def opt(default, help: str, choices=None, cli: bool = True, kind: str | None = None):
    """A method option: its default, help text and choices (comprune.cli.prune builds a flag from them)."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli, "kind": kind})


@dataclass(frozen=True)
class COMPOptions:
    # Stage 1 (layers)
    layer_score: str = opt("bi", "block score: bi (block influence) or loss (calibration loss when skipped)",
                           LAYER_SCORES)
    layer_score_nsamples: int = opt(16, "windows the (expensive) loss-based layer score uses")
    layer_scores: tuple | None = opt(None, "precomputed layer scores for this model and calibration", cli=False)
    # Stage 2 (neurons)
    metric: str = opt("obs", "neuron importance (obs: structured OBS; comp-spec: condition)", NEURON_METRICS)
    damp: float = opt(0.01, "delta in G + delta * mean(diag G) * I")
    chunk: int = opt(0, "neurons removed between downdates of G^-1 (0: auto, ~32 steps per layer)")
    width_allocation: str = opt(
        "uniform", "neurons removed per block: the same everywhere (uniform), from a global ranking of normalised "
        "scores across blocks (adaptive), or per-block levels searched against the whole model's KL on held-apart "
        "windows (search: DP start, then --search-generations)", WIDTH_ALLOCATIONS)
    allocation_norm: str = opt("output", "adaptive: scores relative to the residual stream's (output) or the MLP's "
                               "own (mlp) energy", ("output", "mlp"))
    allocation_score: str = opt("condition", "adaptive: COMP's condition score or FLAP's fluctuation",
                                ("condition", "fluctuation"))
    search_generations: int = opt(0, "search: evolutionary generations after the DP allocation (0: DP only)")
    search_time: float = opt(0.0, "search: wall-clock limit of the evolution, e.g. 20m (0: none; with a limit the "
                             "result depends on the machine's speed)", kind="duration")
    search_nsamples: int = opt(16, "search: fitness windows, apart from the calibration windows")
    search_levels: int = opt(16, "search: ladder levels (a level removes width / levels neurons)")
    search_max_share: float = opt(0.75, "search: no block loses more than this share of its MLP")
    search_offspring: int = opt(8, "search: offspring per generation")
    search_survivors: int = opt(2, "search: survivors per generation")
    search_filter: int = opt(2, "search: windows of the cheap stages (error curves, offspring filter)")
    search_layers: bool = opt(False, "search: a block may also be removed whole, so the search chooses which "
                              "blocks go as well as the widths (with --layer-share 0 it chooses them all)")
    # Stage 3 (mask tuning)
    mask_tuning: bool = opt(True, "recovery after each block's selection (--no-mask-tuning: none)")
    recovery: str = opt("least-squares", "least-squares: refit the kept down_proj/o_proj columns; scales: COMP's "
                        "per-neuron mask tuning (comp-spec)", ("scales", "least-squares"))
    target_mix: float = opt(0.0, "least squares' target: 0 = the dense block on the pruned inputs, 1 = the dense "
                            "model's own trajectory (corrects upstream drift), or between")
    token_weight: str = opt("output", "output: each token's error relative to the block output's mean square, so "
                            "the attention sink's massive activations do not own the fit; none: plain squared error",
                            ("none", "output"))
    layer_compensation: bool = opt(False, "the kept block before a removed span refits its down_proj onto the "
                                   "span's output (ReplaceMe-style, folded in: no new parameters)")
    ridge: float = opt(0.01, "rho: ridge toward scale 1 of the per-neuron scales, relative to mean(diag A)")
    mlp_rebuild: str = opt("auto", "how a block's outputs are rebuilt after its MLP changes: from the MLP input "
                           "(x) or the residual (r); both give the same bits", ("auto", "x", "r"))

    @property
    def fitness_windows(self) -> int:
        return self.search_nsamples if self.width_allocation == "search" else 0

    def validate(self, cfg) -> None:
        for name in ("damp", "ridge", "target_mix", "search_max_share"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise CompruneError(f"{name} must be a finite number (got {value}): "
                                    f"--{name.replace('_', '-')} takes e.g. {getattr(COMPOptions, name)}")
        for name, allowed in (("metric", NEURON_METRICS), ("layer_score", LAYER_SCORES),
                              ("width_allocation", WIDTH_ALLOCATIONS), ("token_weight", ("none", "output")),
                              ("recovery", ("scales", "least-squares")), ("mlp_rebuild", ("auto", "x", "r")),
                              ("allocation_norm", ("output", "mlp")),
                              ("allocation_score", ("condition", "fluctuation"))):
            if getattr(self, name) not in allowed:
                raise CompruneError(f"unknown {name.replace('_', ' ')} '{getattr(self, name)}': use one of "
                                    f"{', '.join(allowed)}")
        if not 0 <= self.target_mix <= 1:
            raise CompruneError(f"target_mix must be in [0, 1] (got {self.target_mix})")
        if (self.target_mix or self.layer_compensation) and (self.recovery != "least-squares" or not self.mask_tuning):
            raise CompruneError("--target-mix and --layer-compensation refit by least squares: add "
                                "--recovery least-squares (and keep mask tuning on)")
        if self.chunk < 0:
            raise CompruneError("chunk must be >= 0")
        finite_duration(self.search_time, "--search-time")
        if self.search_generations < 0 or self.search_nsamples < 1 or self.search_levels < 2 \
                or not 0 < self.search_max_share < 1 or self.search_offspring < 1 or self.search_survivors < 1 \
                or self.search_filter < 1:
            raise CompruneError("search settings out of range: generations and time >= 0, nsamples and offspring >= 1, "
                                "levels >= 2, max share in (0, 1)")
        if self.damp < 0 or self.ridge < 0:
            raise CompruneError("damp and ridge must be >= 0")
