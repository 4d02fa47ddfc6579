"""The recovery stages as a prune runs them: the dense model's targets (and, for distillation, a copy of it as the
teacher) taken before the walk changes the model, then each stage in turn on the pruned model."""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..data import Calibration, get_calibration, heldout_windows, load_ids, sample_windows
from ..errors import CompruneError
from .distill import DistillOptions, distill
from .targets import DenseTargets
from .tune import TuneOptions, tune


@dataclass(frozen=True)
class Recovery:
    """Which stages run after the walk, in order: mask tuning, then distillation."""
    tune: TuneOptions | None = None
    distill: DistillOptions | None = None
    heldout: int = 16  # held-out windows both stages stop early on

    def __bool__(self) -> bool:
        return self.tune is not None or self.distill is not None

    def __post_init__(self):
        if self.heldout < 1:
            raise CompruneError(f"--recover-heldout {self.heldout}: use a positive number of windows")


@dataclass
class Prepared:
    heldout: DenseTargets
    train: DenseTargets | None = None           # tuning's calibration windows, their dense targets
    teacher: object = None                      # distillation's dense model
    distill_ids: torch.Tensor | None = None
    seconds: float = 0.0
    sources: dict = field(default_factory=dict)


def heldout_ids(tokenizer, calibration: Calibration, n: int, model=None) -> tuple[torch.Tensor, str, bool]:
    """(windows held out from training, what they are, whether they are the calibration's own last windows): the
    C4 sample's held-out documents when calibrating on C4; else windows of the calibration source apart from the
    calibration windows (as the width search draws; for `self` and mixes, drawn by get_calibration with the dense
    `model`); else the calibration's last n windows."""
    T = calibration.seqlen
    if tokenizer is not None and calibration.source == "c4":
        try:
            return get_calibration(tokenizer, "c4-validation", n, T, calibration.seed,
                                   data_dir=calibration.data_dir).input_ids, "c4-validation", False
        except CompruneError:
            pass
    ids = heldout_windows(tokenizer, calibration, n, T, calibration.data_dir) if tokenizer is not None else None
    if ids is None and tokenizer is not None and model is not None:
        ids = _drawn_apart(model, tokenizer, calibration, n)
    if ids is not None:
        return ids, f"{calibration.source} (apart from the calibration windows)", False
    if calibration.nsamples <= n:
        raise CompruneError(f"recovery holds {n} of the {calibration.nsamples} calibration windows apart for early "
                            "stopping: pass more --nsamples or a smaller --recover-heldout")
    return calibration.input_ids[-n:], "the last calibration windows", True


def _drawn_apart(model, tokenizer, calibration: Calibration, n: int) -> torch.Tensor | None:
    """A `self` or mixed calibration's held-out windows, each part's as its source draws them apart (self: the
    held-apart prompts), or None where the draw does not give back the calibration windows."""
    try:
        c = get_calibration(tokenizer, calibration.source, calibration.nsamples, calibration.seqlen, calibration.seed,
                            data_dir=calibration.data_dir, heldout=n, model=model, progress=False)
    except CompruneError:
        return None
    return c.heldout if torch.equal(c.input_ids, calibration.input_ids) else None


def split_windows(tokenizer, calibration: Calibration, heldout: int,
                  model=None) -> tuple[torch.Tensor, torch.Tensor, str, bool]:
    """(training windows, held-out windows, what the held-out ones are, whether they are the calibration's own last
    windows, and so left out of training). `model`: the dense model, which writes a `self` part's held-out text."""
    held, what, from_calib = heldout_ids(tokenizer, calibration, heldout, model)
    train = calibration.input_ids[:-heldout] if from_calib else calibration.input_ids
    return train, held, what, from_calib


def training_windows(tokenizer, calibration: Calibration, train: torch.Tensor, tokens: int,
                     apart: bool) -> torch.Tensor:
    """The calibration windows (the first `tokens` of them where fewer), then (C4, whose held-out documents are
    apart) more windows of the source up to `tokens`; elsewhere the calibration windows alone (a stage runs them
    epoch after epoch). tokens 0: the calibration windows."""
    T = calibration.seqlen
    if tokens and tokens <= train.shape[0] * T:
        return train[:max(1, tokens // T)]
    want = -(-tokens // T) - train.shape[0]
    if want <= 0 or apart or tokenizer is None or calibration.source != "c4":
        return train
    ids = load_ids(tokenizer, calibration.source, calibration.data_dir)
    return torch.cat([train, sample_windows(ids, want, T, calibration.seed + 1)])


def distill_windows(model, tokenizer, calibration: Calibration, train: torch.Tensor, opts: DistillOptions,
                    apart: bool) -> torch.Tensor:
    """Distillation's text: `opts.data` (or, for another window length, the calibration's source) drawn for
    `opts.tokens` tokens in windows of `opts.seqlen` (a mix with `self` has the dense model write its part, extending
    the calibration's own), else the training windows. Where the held-out windows are the calibration's own
    (`apart`), the draw takes the next seed, so it does not repeat them."""
    T = opts.seqlen or calibration.seqlen
    if not opts.data and T == calibration.seqlen:
        return training_windows(tokenizer, calibration, train, opts.tokens, apart)
    return get_calibration(tokenizer, opts.data or calibration.source, max(1, opts.tokens // T), T,
                           calibration.seed + int(apart), data_dir=calibration.data_dir, model=model).input_ids


@contextmanager
def on_device(model, device):
    """The model on `device` for a stage (a prune keeps it where it was loaded and moves blocks), then back."""
    home = next(model.parameters()).device
    if torch.device(device) == home:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def prepare(model, tokenizer, calibration: Calibration, recovery: Recovery, device="cpu") -> Prepared:
    """What the stages need of the dense model, taken before the walk."""
    t0 = time.perf_counter()
    with on_device(model, device):
        return _prepare(model, tokenizer, calibration, recovery, device, t0)


def _prepare(model, tokenizer, calibration, recovery, device, t0) -> Prepared:
    train, held, what, from_calib = split_windows(tokenizer, calibration, recovery.heldout, model)
    batch = recovery.tune.batch if recovery.tune is not None else 4
    out = Prepared(DenseTargets.capture(model, held, batch, device))
    out.sources = {"heldout": what, "train": calibration.source}
    if recovery.tune is not None:
        opts = recovery.tune
        ids = training_windows(tokenizer, calibration, train, opts.tokens, from_calib)
        out.train = DenseTargets.capture(model, ids, opts.batch, device)
    if recovery.distill is not None:
        out.teacher = copy.deepcopy(model)
        out.distill_ids = distill_windows(model, tokenizer, calibration, train, recovery.distill, from_calib)
        out.sources["distill"] = recovery.distill.data or calibration.source
    out.seconds = time.perf_counter() - t0
    return out


def run(model, adapter, prepared: Prepared, recovery: Recovery, device="cpu", checkpoint_dir=None,
        resume: bool = False, progress: bool = True) -> list[dict]:
    """Run the stages on the pruned `model` in place; their records, in order."""
    with on_device(model, device):
        if prepared.teacher is not None:
            prepared.teacher.to(device)
        return _run(model, adapter, prepared, recovery, device, checkpoint_dir, resume, progress)


def _run(model, adapter, prepared, recovery, device, checkpoint_dir, resume, progress) -> list[dict]:
    records = []
    if recovery.tune is not None:
        rec = tune(model, adapter, prepared.train, prepared.heldout, recovery.tune, device, checkpoint_dir, resume,
                   progress)
        records.append({**rec, "targets_seconds": round(prepared.seconds, 2), "data": prepared.sources})
    if recovery.distill is not None:
        rec = distill(model, adapter, prepared.teacher, prepared.distill_ids, prepared.heldout, recovery.distill,
                      device, checkpoint_dir, resume, progress)
        records.append({**rec, "data": prepared.sources})
        prepared.teacher = None
    return records
