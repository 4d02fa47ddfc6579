"""End-to-end mask tuning: after the walk, a scale per kept MLP neuron and attention head (and, optionally, per
output channel of down_proj and o_proj), trained by Adam against KL(dense ‖ pruned) of the whole model's next-token
distribution on calibration windows, stopped early on held-out windows, then folded into the weights.

The scales start at 1 on the least-squares-refitted weights and stay in [1 - bound, 1 + bound] (s = 1 +
bound · tanh θ, θ from 0), optionally pulled toward 1; nothing else trains. Folding multiplies down_proj's and
o_proj's input columns (and output rows) by them: the architecture and the parameter count do not change.

In a process group each rank runs its part of every step's windows; the gradients are summed over the ranks as
parts of the mean over every rank's tokens (the one-process step up to the order of the sum), the held-out KL is
summed with its token counts, rank 0 decides when to stop, and every rank ends with rank 0's folded weights."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..errors import CompruneError
from ..files import tensor_digest_sample
from .state import (Clock, StageCheckpoint, fingerprint, heldout_step, load_optimizer, optimizer_tensors,
                    peak_memory)
from .targets import DenseTargets, trainable_copies

KINDS = ("neurons", "heads", "channels")


@dataclass(frozen=True)
class TuneOptions:
    train: tuple = ("neurons", "heads", "channels")  # neuron scales, head scales, per-channel output scales
    bound: float = 0.5       # scales stay in [1 - bound, 1 + bound]; 0: unbounded
    pull: float = 0.0        # weight of Σ (s - 1)² added to the KL (pulls the scales toward 1)
    steps: int = 64          # optimiser steps at most
    lr: float = 0.01         # Adam's step size (on θ, s = 1 + bound · tanh θ)
    batch: int = 2           # windows per step
    tokens: int = 0          # tokens trained on (0: the calibration windows; more: C4 windows beyond them)
    eval_every: int = 8      # steps between held-out evaluations
    patience: int = 2        # evaluations without a better held-out KL before stopping
    time: float = 0.0        # seconds at most (0: no limit; a time budget makes a resumed run differ)
    seed: int = 0

    def __post_init__(self):
        train = tuple(self.train.split(",")) if isinstance(self.train, str) else tuple(self.train)
        object.__setattr__(self, "train", train)
        bad = [k for k in train if k not in KINDS]
        if bad or not train:
            raise CompruneError(f"--tune-train {','.join(train) or '(empty)'}: use a comma-separated subset of "
                                f"{', '.join(KINDS)}")
        if not 0 <= self.bound < 1:
            raise CompruneError(f"--tune-bound {self.bound}: use a number in [0, 1) (0: unbounded)")
        for name in ("steps", "batch", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise CompruneError(f"tune {name} {getattr(self, name)}: use a positive integer")
        if self.lr <= 0 or self.pull < 0 or self.tokens < 0 or self.time < 0:
            raise CompruneError("tune lr must be positive and pull, tokens and time non-negative")


class Scales:
    """The trainable θ of every scale and the hooks that apply them: the input columns (grouped by head for
    o_proj) or the output rows of down_proj / o_proj."""

    def __init__(self, model, adapter, opts: TuneOptions):
        self.bound, self.sites, self.hooks = opts.bound, [], []
        for i, layer in enumerate(adapter.layers(model)):
            down = adapter.mlp(layer).down
            o = adapter.attention_linears(layer)[3]
            hd = _head_dim(model, adapter.attention(layer), o)
            if "neurons" in opts.train:
                self.sites.append((f"{i}.neurons", down, "in", 1, down.in_features))
            if "heads" in opts.train:
                self.sites.append((f"{i}.heads", o, "in", hd, o.in_features // hd))
            if "channels" in opts.train:
                self.sites.append((f"{i}.mlp_channels", down, "out", 1, down.out_features))
                self.sites.append((f"{i}.attn_channels", o, "out", 1, o.out_features))
        dev = next(model.parameters()).device
        self.theta = {name: torch.nn.Parameter(torch.zeros(n, device=dev)) for name, _, _, _, n in self.sites}

    def numel(self) -> int:
        return sum(t.numel() for t in self.theta.values())

    def scale(self, name: str) -> torch.Tensor:
        t = self.theta[name]
        return 1 + self.bound * torch.tanh(t) if self.bound else 1 + t

    def penalty(self) -> torch.Tensor:
        return sum(((self.scale(n) - 1) ** 2).sum() for n in self.theta)

    def attach(self):
        for name, mod, where, rep, _ in self.sites:
            if where == "in":
                def pre(m, args, name=name, rep=rep):
                    s = self.scale(name).repeat_interleave(rep).to(args[0].dtype)
                    return (args[0] * s,) + tuple(args[1:])
                self.hooks.append(mod.register_forward_pre_hook(pre))
            else:
                self.hooks.append(mod.register_forward_hook(
                    lambda m, a, out, name=name: out * self.scale(name).to(out.dtype)))

    def detach(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []

    @torch.no_grad()
    def fold(self):
        """Multiply the scales into the weights (and biases of scaled outputs)."""
        for name, mod, where, rep, _ in self.sites:
            s = self.scale(name).to(mod.weight.dtype)
            if where == "in":
                mod.weight.mul_(s.repeat_interleave(rep)[None, :])
            else:
                mod.weight.mul_(s[:, None])
                if mod.bias is not None:
                    mod.bias.mul_(s)


def _head_dim(model, attn, o) -> int:
    hd = getattr(attn, "head_dim", None) or getattr(model.config, "head_dim", None) or \
        model.config.hidden_size // model.config.num_attention_heads
    if o.in_features % hd:
        raise CompruneError(f"o_proj's {o.in_features} inputs are not whole heads of {hd}: tune without heads "
                            "(--tune-train neurons)")
    return hd


def tune(model, adapter, train: DenseTargets, heldout: DenseTargets, opts: TuneOptions, device="cpu",
         checkpoint_dir=None, resume: bool = False, progress: bool = True) -> dict:
    """Tune the scales of `model` (pruned, in place) against the dense targets, fold them and return the stage's
    record. `train`: the calibration windows' dense targets (batches of opts.batch windows); `heldout`: the
    held-out windows'. With `checkpoint_dir`, progress is saved at every held-out evaluation and `resume`
    continues from it to the uninterrupted result."""
    if getattr(adapter, "moe", False):
        raise CompruneError("--tune scales dense MLP neurons; this mixture-of-experts model has none: prune it "
                            "without --tune")
    clock = Clock(opts.time)
    trainable_copies(model)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    scales = Scales(model, adapter, opts)
    opt = torch.optim.Adam(list(scales.theta.values()), lr=opts.lr)
    ckpt = StageCheckpoint(checkpoint_dir, "tune", fingerprint(
        dataclasses.asdict(opts), train.sha256(), heldout.sha256(),
        tensor_digest_sample(model.state_dict().items())))
    state = ckpt.load() if resume else None
    if not resume:
        ckpt.clear()
    scales.attach()
    try:
        if state is None:
            kl0 = heldout.kl(model, device)
            prog = {"step": 0, "curve": [[0, kl0]], "best": kl0, "best_step": 0, "bad": 0, "seconds": 0.0,
                    "stopped": None}
            best = {n: t.detach().clone() for n, t in scales.theta.items()}
        else:
            prog, tensors = state
            clock.already = prog["seconds"]
            with torch.no_grad():
                for n, t in scales.theta.items():
                    t.copy_(tensors[f"theta.{n}"])
            load_optimizer(opt, tensors)
            best = {n: tensors[f"best.{n}"].to(t.device) for n, t in scales.theta.items()}
        bar = tqdm(total=opts.steps, initial=prog["step"], desc="tune", disable=not progress, leave=False)
        while prog["stopped"] is None:
            step = prog["step"]
            if step >= opts.steps:
                prog["stopped"] = "steps"
                break
            if opts.time and distributed.decided(clock.spent()):
                prog["stopped"] = "time"
                break
            opt.zero_grad(set_to_none=True)
            loss = _backward(model, scales, train, _order(len(train.ids), opts.seed, step), opts.pull, device)
            opt.step()
            prog["step"] = step = step + 1
            bar.update(1)
            bar.set_postfix(kl=f"{float(loss.detach()):.4f}")
            if step % opts.eval_every and step < opts.steps:
                continue
            best = heldout_step(prog, step, heldout.kl(model, device), scales.theta, best, opts.patience,
                                clock.seconds)
            ckpt.save(step, prog, {**{f"theta.{n}": t for n, t in scales.theta.items()},
                                   **{f"best.{n}": t for n, t in best.items()}, **optimizer_tensors(opt)})
        bar.close()
    finally:
        scales.detach()
        for p, req in frozen:
            p.requires_grad_(req)
    with torch.no_grad():
        for n, t in scales.theta.items():
            t.copy_(best[n])
    scales.fold()
    for mod in {id(m): m for _, m, _, _, _ in scales.sites}.values():  # rank 0's folded weights on every rank
        for t in (mod.weight, mod.bias):
            if t is not None:
                distributed.broadcast(t.data)
    s_all = torch.cat([scales.scale(n).detach().flatten() for n in scales.theta])
    return {"stage": "tune", "options": dataclasses.asdict(opts), "trained": scales.numel(), "steps": prog["step"],
            "tokens": prog["step"] * opts.batch * int(train.ids[0].shape[1]), "data_sha256": train.sha256(),
            "heldout_sha256": heldout.sha256(), "heldout_tokens": heldout.tokens, "heldout_kl": prog["curve"],
            "kl_before": prog["curve"][0][1], "kl_after": prog["best"], "best_step": prog["best_step"],
            "stopped": prog["stopped"], "scale_range": [float(s_all.min()), float(s_all.max())],
            "seconds": round(clock.seconds, 2), "world_size": distributed.world_size(), **peak_memory(device)}


def _backward(model, scales: Scales, train: DenseTargets, k: int, pull: float, device) -> torch.Tensor:
    """The gradient of the mean per-token KL on batch k (plus the pull) into the scales' θ: each rank's part of the
    batch as its share of the mean over every rank's tokens, summed over the ranks; returns this rank's loss."""
    part, n = train.loss_sum(model, k, device)
    total = distributed.sum_floats(n)[0]
    loss = part / total if part is not None else torch.zeros(())
    if part is not None:
        loss.backward()
    for t in scales.theta.values():
        if t.grad is None:
            t.grad = torch.zeros_like(t)
        distributed.all_reduce_sum(t.grad)
    if pull:
        penalty = pull * scales.penalty()
        penalty.backward()
        loss = loss + penalty.detach()
    return loss


def _order(n: int, seed: int, step: int) -> int:
    """The batch of step `step`: a fresh permutation of the n batches every pass, a function of (seed, step) alone
    (a resumed run draws the same)."""
    epoch, k = divmod(step, n)
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return int(torch.randperm(n, generator=g)[k])
