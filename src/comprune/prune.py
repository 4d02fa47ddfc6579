"""comprune.prune: calibrate, walk the blocks with a method, cut, and report."""
from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import transformers

from . import distributed
from .budget import block_params, budget_base, plan_budget, settled
from .checkpoint import Checkpoint, run_fingerprint
from .config import PruneConfig
from .data import Calibration, get_calibration, heldout_windows
from .devices import dtype_name, resolve_device
from .errors import CompruneError
from .files import tensor_digest_sample
from .loading import count_params
from .memory import peak_rss_mb
from . import methods as _builtin  # noqa: F401  (the built-in methods register on import)
from . import recover
from .recover import Recovery
from .registry import get as get_method
from .methods.experts import check_moe_config
from .models import get_adapter
from .surgery import drop_layers, finalize_config, mlp_width
from .version import __version__
from .sequential import Walk, walk_blocks
from .walk import IN_MEMORY, IN_PLACE, ActivationStore, Residency


def versions() -> dict:
    return {"comprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


@dataclass
class PruneReport:
    method: str
    ratio_requested: float
    ratio_achieved: float
    params_before: int
    params_after: int
    removed_layers: list[int]
    kept_layers: list[int]
    mlp_widths: list[int]
    seconds: float
    peak_rss_mb: float
    config: dict
    calibration: dict
    budget: dict
    layer_scores: list[float] = field(default_factory=list)
    blocks: dict = field(default_factory=dict)       # original layer index -> per-block record
    versions: dict = field(default_factory=dict)
    base_model: str | None = None
    details: dict = field(default_factory=dict)      # method-specific extras (e.g. flap bias, llm-pruner taylor)
    precision: dict = field(default_factory=dict)    # the precision that ran, how it was chosen (and saved in)
    ratio_of: str = "all"                            # ratios are fractions of all parameters or of the blocks'
    target: dict = field(default_factory=dict)       # a size or speed target's record (comprune.budget.targets)
    distributed: dict = field(default_factory=dict)  # the process group that ran it (world size, backend, shares)
    stages: list = field(default_factory=list)       # the recovery stages that ran after the walk (comprune.recover)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = {str(k): v for k, v in self.blocks.items()}
        target = d.pop("target")
        if target:  # under its kind, as comprune.budget.targets.finish completes it
            d[target["kind"]] = target
        if not d["distributed"]:  # one process: nothing to say
            del d["distributed"]
        if not d["stages"]:
            d.pop("stages")
        return d

    def summary_rows(self) -> list[dict]:
        return [{"method": self.method, "ratio req": self.ratio_requested, "ratio got": round(self.ratio_achieved, 4),
                 "params before": self.params_before, "params after": self.params_after,
                 "layers": f"{len(self.kept_layers)}/{len(self.kept_layers) + len(self.removed_layers)}",
                 "MLP widths": _widths_text(self.mlp_widths), "seconds": round(self.seconds, 1),
                 "peak RSS MB": round(self.peak_rss_mb)}]


RATIO_TOLERANCE = 0.005


def _check_round_to(model, adapter, cfg):
    widths = [mlp_width(adapter, layer) for layer in adapter.layers(model)]
    if widths and cfg.round_to > min(widths):
        raise CompruneError(f"--round-to {cfg.round_to} is larger than the MLP widths ({min(widths)}): use a "
                            "small multiple such as 8, 32 or 64")


def _check_ratio(report, cfg, details):
    """A result that misses the requested ratio by more than 0.5 % (or half the plan's coarsest width step, e.g.
    8 neurons of every expert, plus the one neuron per block the plan's count rounds to before the widths are
    rounded) is an error, unless the method says why (a `ratio_note` in its details, e.g. layer-drop's one-block
    granularity)."""
    miss = report.ratio_achieved - report.ratio_requested
    # what the ratio is a fraction of (all parameters or the blocks'), from the plan
    base = report.budget.get("params_to_remove", 0) / report.ratio_requested
    step = report.budget.get("quantum_params", 0)  # a plan's coarsest width step, over every kept block
    half_step = (step / 2 + step / max(cfg.round_to, 1)) / max(base, 1)
    if abs(miss) <= max(RATIO_TOLERANCE, half_step * 1.01) or details.get("ratio_note"):
        return
    hint = (f"--round-to {cfg.round_to} makes MLP widths multiples of {cfg.round_to}: use a smaller one"
            if cfg.round_to > 1 else "change --layer-share or --ratio")
    raise CompruneError(f"the pruned model removes {report.ratio_achieved:.4f} of the parameters, not the "
                        f"{report.ratio_requested} requested: {hint}")


def precision_record(model) -> dict:
    """The precision the model computed in (its parameters' dtype) and how it was chosen, when comprune.load
    chose it; the statistics deciding the prune (Grams, inverses, least squares) are float32/float64 whatever
    this is. The probe's rates are left out (they vary run to run; `comprune eval --json` reports them)."""
    rec = dict(getattr(model, "comprune_precision", None) or {"requested": None, "reason": "model passed in"})
    rec.pop("probe_gflops", None)  # timings vary run to run; a manifest is the same for the same prune
    rec["dtype"] = dtype_name(next(model.parameters()).dtype)
    rec["statistics"] = "float64 Grams and solves (float32 products accumulated in float64)"
    return rec


def blocks_share_note(model, adapter, cfg, budget) -> str | None:
    """A ratio of all parameters can take most of the blocks' when embeddings dominate (Gemma 3 270M: 63 %):
    said whenever it takes over half of them."""
    if cfg.ratio_of != "all":
        return None
    blocks = block_params(model, adapter)
    share = budget.params_to_remove / max(blocks, 1)
    if share <= 0.5:
        return None
    embeddings = 1 - blocks / max(count_params(model), 1)
    return (f"--ratio {cfg.ratio} of all parameters removes {share:.0%} of the decoder blocks' parameters "
            f"({embeddings:.0%} of this model is embeddings and LM head, which no method prunes): --ratio-of blocks "
            "budgets over the blocks alone")


def _widths_text(widths):
    if not widths:
        return "-"
    return str(widths[0]) if len(set(widths)) == 1 else f"{min(widths)}..{max(widths)}"


def _fitness_windows(tokenizer, calibration: Calibration, cfg) -> tuple[Calibration, torch.Tensor]:
    """(calibration, the search's fitness windows): windows of the calibration source apart from the calibration
    windows; when the calibration came as bare windows, its last search_nsamples windows are held apart instead."""
    ids = calibration.heldout
    k = cfg.heldout_windows
    if ids is not None and tuple(ids.shape) != (k, calibration.seqlen):
        ids = None
    if ids is None and tokenizer is not None:
        ids = heldout_windows(tokenizer, calibration, k, calibration.seqlen, calibration.data_dir)
    if ids is not None:
        return calibration, ids
    if calibration.nsamples <= k:
        raise CompruneError(f"--width-allocation search holds {k} of the {calibration.nsamples} calibration windows "
                            "apart for its fitness: pass more --nsamples or fewer --search-nsamples")
    ids = calibration.input_ids
    return Calibration(ids[:-k], calibration.source, calibration.seed), ids[-k:]


def prune(model, tokenizer, config: PruneConfig | None = None, calibration: Calibration | None = None,
          progress: bool = True, base_model: str | None = None, checkpoint_dir=None, resume: bool = False,
          model_digest: str | None = None, target: dict | None = None, residency: Residency = IN_PLACE,
          store: ActivationStore = IN_MEMORY, recovery: Recovery | None = None):
    """Prune `model` in place with `config` and return (model, PruneReport). Forward passes only for COMP.
    `target`: the record of the size or speed target `config` was resolved from (comprune.budget.targets),
    carried into the report. `recovery`: the stages (mask tuning, distillation) that run on the pruned model,
    recorded in the report's `stages`.

    With `checkpoint_dir`, progress is saved after every block; `resume=True` continues an interrupted run
    from its last finished block (same arguments and model required) with a bit-identical result. The model's
    identity in the checkpoint is `model_digest`, else a sample of its weights' values."""
    cfg = (config or PruneConfig()).validate()
    adapter = get_adapter(model)
    if distributed.init(resolve_device(cfg.device)):
        _check_group(adapter, residency)
    if adapter.fused and residency.streamed:
        raise CompruneError(f"{adapter.family} stores q/k/v and gate/up as fused matrices, which --stream does not "
                            "split yet: prune it without --stream")
    adapter.prepare(model)  # fused projections as their parts while pruning; restored below (or on error)
    try:
        return _prune(model, adapter, tokenizer, cfg, calibration, progress, base_model, checkpoint_dir, resume,
                      model_digest, target, residency, store, recovery)
    finally:
        adapter.restore(model)


def _check_group(adapter, residency):
    """What a prune in a process group does not do yet, refused before any work (comprune.distributed)."""
    if residency.streamed:
        raise CompruneError("--stream runs in one process: drop --stream or run without torchrun")
    if getattr(adapter, "moe", False):
        raise CompruneError("mixture-of-experts models are pruned in one process: run without torchrun")


def _prune(model, adapter, tokenizer, cfg, calibration, progress, base_model, checkpoint_dir, resume, model_digest,
           target, residency, store, recovery=None):
    device = resolve_device(cfg.device)  # the config keeps what was asked; the walk carries what was resolved
    method = get_method(cfg.method)
    t0 = time.perf_counter()
    progress = progress and distributed.is_writer()  # one progress bar for the group
    if getattr(adapter, "moe", False) and cfg.method == "comp":
        check_moe_config(cfg)
    if calibration is None:
        calibration = get_calibration(tokenizer, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed,
                                      heldout=cfg.heldout_windows, model=model, progress=progress)
    if calibration.seqlen <= 1:
        raise CompruneError("calibration windows must be longer than one token")
    fitness_ids = None
    if method.uses_fitness and cfg.heldout_windows:
        calibration, fitness_ids = _fitness_windows(tokenizer, calibration, cfg)
    model.eval()
    # the dense model's targets (and teacher), before the walk changes it
    prepared = recover.prepare(model, tokenizer, calibration, recovery, device) if recovery else None
    params_before = count_params(model)
    base_before = budget_base(model, adapter, cfg)
    _check_round_to(model, adapter, cfg)
    budget = (method.plan_budget or plan_budget)(model, adapter, cfg)
    note = blocks_share_note(model, adapter, cfg, budget)
    if note and progress:
        print(f"comprune: note: {note}", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    ckpt = None
    if checkpoint_dir is not None and method.resumable:
        if model_digest is None:
            model_digest = tensor_digest_sample(model.state_dict().items())
        # a group's checkpoint holds each rank's share of the activations: resumable by the same split only
        group = distributed.describe()
        ckpt = Checkpoint(checkpoint_dir, run_fingerprint({**cfg.to_dict(), **({"group": group} if group else {})},
                                                          calibration.sha256(), params_before, model_digest))
        if resume:
            ckpt.verify()
        else:
            ckpt.clear()
            ckpt = Checkpoint(checkpoint_dir, ckpt.fingerprint)
            ckpt.claim(getattr(model, "comprune_precision", None))
    if resume and ckpt is None:
        raise CompruneError(f"method '{cfg.method}' cannot resume: rerun without --resume")
    walk = Walk(model, adapter, cfg, budget, device, calibration.input_ids, progress, ckpt,
                fitness_ids if method.uses_fitness else None, residency, store)
    # Forward-only methods get the block-0 inputs; gradient methods (llm-pruner) run their own passes.
    needs_grad = method.needs_gradients
    acts = None if needs_grad else walk.capture()
    with torch.set_grad_enabled(needs_grad):
        plan, records, _ = walk_blocks(walk, acts, method.step, method.plan, method.desc or method.name,
                                       method.prepare, method.pack, method.unpack)
    details = method.details(walk, plan, records) if method.details is not None else \
        {"removed_layers": list(plan.get("removed_layers", [])), "blocks": records}
    n_layers = len(adapter.layers(model))
    kept = drop_layers(model, adapter, details["removed_layers"])
    widths = finalize_config(model, adapter)
    params_after = count_params(model)
    report = PruneReport(
        method=cfg.method, ratio_requested=cfg.ratio, ratio_achieved=(params_before - params_after) / base_before,
        params_before=params_before, params_after=params_after, removed_layers=list(details["removed_layers"]),
        kept_layers=kept, mlp_widths=widths, seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb(),
        config={**cfg.to_dict(), "device": str(device)}, calibration=calibration.describe(), budget=budget.to_dict(),
        layer_scores=details.get("layer_scores", []), blocks=details.get("blocks", {}), versions=versions(),
        base_model=base_model,
        details={k: v for k, v in details.items() if k not in ("removed_layers", "layer_scores", "blocks")},
        precision=precision_record(model), ratio_of=cfg.ratio_of, distributed=distributed.describe())
    report.target = settled(target, report.details) or {}
    if note:
        report.details["budget_note"] = note
    assert len(kept) + len(report.removed_layers) == n_layers
    _check_ratio(report, cfg, details)
    if prepared is not None:
        report.stages = recover.run(model, adapter, prepared, recovery, device, ckpt.dir if ckpt else None, resume,
                                    progress)
        assert count_params(model) == params_after
    model.comprune_report = report
    return model, report
