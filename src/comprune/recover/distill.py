"""Knowledge distillation from the dense model into the pruned one through LoRA adapters (peft) on the kept
linear layers of every block, merged into the weights at the end (or, `train="weights"`, through those layers'
weights themselves, at four times their float32 size in memory with Adam's state): the architecture and the
parameter count stay the same. Budgeted in tokens and wall time, stopped early on held-out windows (their dense
targets cached), in bf16 autocast where the host multiplies bf16 natively.

In a process group each rank runs its part of every step's windows (and the teacher on them); the adapters'
gradients are summed over the ranks as parts of the mean over every rank's tokens, rank 0 decides when to stop,
and every rank ends with rank 0's merged weights."""
from __future__ import annotations

import dataclasses
import hashlib
import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..data import check_source
from ..errors import CompruneError
from ..files import tensor_digest_sample
from ..precision import native_bf16
from .state import (Clock, StageCheckpoint, fingerprint, heldout_step, load_optimizer, optimizer_tensors,
                    peak_memory)
from .targets import DenseTargets, trainable_copies, model_outputs


LR = {"lora": 1e-3, "weights": 1e-4}  # the default step size of each kind of training


@dataclass(frozen=True)
class DistillOptions:
    tokens: int = 1_000_000  # training tokens at most
    time: float = 0.0        # seconds at most (0: no limit; a time budget makes a resumed run differ)
    train: str = "lora"      # lora: LoRA adapters merged at the end; weights: the linear layers' weights themselves
    rank: int = 8            # LoRA rank
    alpha: float = 16.0      # LoRA scaling numerator (scale alpha / rank)
    lr: float | None = None  # None: chosen on WikiText-2 validation for what trains (LR below; docs/recovery.md)
    batch: int = 4           # windows per step
    eval_every: int = 50     # steps between held-out evaluations
    patience: int = 3        # evaluations without a better held-out KL before stopping
    decay: float = 0.5       # after such an evaluation: back to the best adapters, the step size times this
    clip: float = 1.0        # the adapters' gradient norm at most (0: unclipped)
    bf16: str = "auto"       # autocast: auto (where the device multiplies bf16 natively), on, off
    seed: int = 0
    data: str = ""           # a source or mix to distil on (c4, self, self:0.5,c4:0.5); "": the calibration windows
    seqlen: int = 0          # window length distilled on (0: the calibration's)

    def __post_init__(self):
        if self.lr is None and self.train in LR:
            object.__setattr__(self, "lr", LR[self.train])
        if self.seqlen < 0:
            raise CompruneError(f"distill seqlen {self.seqlen}: use a window length in tokens (0: the calibration's)")
        for name in ("tokens", "rank", "batch", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise CompruneError(f"distill {name} {getattr(self, name)}: use a positive integer")
        if self.train not in LR:
            raise CompruneError(f"distill train '{self.train}': use lora or weights")
        if self.lr <= 0 or self.time < 0 or self.alpha <= 0 or self.clip < 0:
            raise CompruneError("distill lr and alpha must be positive, time and clip non-negative")
        if not 0 < self.decay <= 1:
            raise CompruneError(f"distill decay {self.decay}: use a factor in (0, 1] (1: the step size stays)")
        if self.bf16 not in ("auto", "on", "off"):
            raise CompruneError(f"distill bf16 '{self.bf16}': use auto, on or off")
        if self.data:
            check_source(self.data)


def _peft():
    try:
        import peft
    except ImportError:
        raise CompruneError("--recover distill needs peft: pip install 'comprune[recover]'") from None
    return peft


def linear_names(model, adapter) -> list[str]:
    """The full names of every block's attention and MLP linear layers."""
    wanted = set()
    for layer in adapter.layers(model):
        mlp = adapter.mlp(layer)
        wanted.update(id(m) for m in (*adapter.attention_linears(layer), mlp.up, mlp.down, mlp.gate) if m is not None)
    return [n for n, m in model.named_modules() if id(m) in wanted and isinstance(m, torch.nn.Linear)]


def _autocast(device, mode: str):
    dev = torch.device(device).type
    native = (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if dev == "cuda" else bool(native_bf16())
    on = mode == "on" or (mode == "auto" and native)
    return (torch.autocast(dev, dtype=torch.bfloat16) if on else nullcontext()), on


def _kd_loss(student, teacher, ids, cast) -> torch.Tensor:
    """Σ per-token KL(teacher ‖ student) over the full vocabulary of one batch's windows (never stored)."""
    with torch.no_grad(), cast:
        logp_t = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)
    with cast:
        _, z = model_outputs(student, ids)
    logq = torch.log_softmax(z.float(), -1)
    return (logp_t.exp() * (logp_t - logq)).sum()


def _backward(student, teacher, ids, cast, params) -> float:
    """The gradient of the mean per-token KL of a step's windows into the adapters: this rank's part of them as its
    share of the mean over every rank's tokens, summed over the ranks; returns the step's mean KL."""
    total = distributed.sum_floats(ids.numel())[0]
    loss = _kd_loss(student, teacher, ids, cast) / total if ids.numel() else None
    if loss is not None:
        loss.backward()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        distributed.all_reduce_sum(p.grad)
    return distributed.sum_floats(float(loss.detach()) if loss is not None else 0.0)[0]


def distill(model, adapter, teacher, train_ids: torch.Tensor, heldout: DenseTargets, opts: DistillOptions,
            device="cpu", checkpoint_dir=None, resume: bool = False, progress: bool = True) -> dict:
    """Distil `teacher` (the dense model) into `model` (pruned, in place) on `train_ids` [N, T] windows, through
    LoRA adapters merged at the end or the linear layers' weights (`opts.train`); return the stage's record.
    `heldout`: the dense targets early stopping reads.
    With `checkpoint_dir`, progress is saved at every held-out evaluation and `resume` continues from it."""
    clock = Clock(opts.time)
    trainable_copies(model)
    cast, bf16 = _autocast(device, opts.bf16)
    dtype = next(model.parameters()).dtype
    model.float()  # the adapters and Adam's state in float32 (the weights go back to their dtype when merged)
    teacher.eval()
    names = linear_names(model, adapter)
    if not names:
        raise CompruneError("no linear layers to adapt in this model's blocks: --recover distill cannot run on it")
    digest = tensor_digest_sample(model.state_dict().items())
    torch.manual_seed(opts.seed)  # the adapters' initial A matrices
    pm = _with_lora(model, names, opts) if opts.train == "lora" else _with_weights(model, names)
    trained = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    params = list(trained.values())
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    T = int(train_ids.shape[1])
    data_sha = _sha(train_ids)
    train_ids = adapter.windows(teacher, train_ids)  # as the walk reads them: <bos> first where the family needs it
    steps_max = max(1, opts.tokens // (opts.batch * T))
    ckpt = StageCheckpoint(checkpoint_dir, "distill", fingerprint(
        dataclasses.asdict(opts), data_sha, heldout.sha256(), digest, names))
    state = ckpt.load() if resume else None
    if not resume:
        ckpt.clear()
    model.train(False)  # no dropout anywhere: the same inputs give the same steps
    if state is None:
        kl0 = heldout.kl(model, device)
        prog = {"step": 0, "curve": [[0, kl0]], "best": kl0, "best_step": 0, "bad": 0, "seconds": 0.0,
                "stopped": None, "losses": [], "lr": opts.lr}
        best = {n: p.detach().clone() for n, p in trained.items()}
    else:
        prog, tensors = state
        clock.already = prog["seconds"]
        with torch.no_grad():
            for n, p in trained.items():
                p.copy_(tensors[f"trained.{n}"])
        load_optimizer(opt, tensors)
        best = {n: tensors[f"best.{n}"].to(p.device) for n, p in trained.items()}
        for g in opt.param_groups:
            g["lr"] = prog["lr"]
    bar = tqdm(total=steps_max, initial=prog["step"], desc="distill", disable=not progress, leave=False)
    n_batches = -(-int(train_ids.shape[0]) // opts.batch)

    def spent() -> bool:  # rank 0's clock decides for the group
        return bool(opts.time) and distributed.decided(clock.spent())
    while prog["stopped"] is None:
        step = prog["step"]
        if step >= steps_max:
            prog["stopped"] = "tokens"
            break
        if spent():
            prog["stopped"] = "time"
            break
        k = step % n_batches
        ids = train_ids[k * opts.batch:(k + 1) * opts.batch]
        opt.zero_grad(set_to_none=True)
        loss = _backward(pm, teacher, ids[distributed.part(ids.shape[0])].to(device), cast, params)
        if opts.clip:  # one batch's spike must not undo the run (the summed gradients: the same on every rank)
            torch.nn.utils.clip_grad_norm_(params, opts.clip)
        opt.step()
        prog["step"] = step = step + 1
        prog["losses"].append(round(loss, 5))
        bar.update(1)
        bar.set_postfix(kd=f"{prog['losses'][-1]:.4f}")
        if step % opts.eval_every and step < steps_max and not spent():
            continue
        best = heldout_step(prog, step, heldout.kl(pm, device), trained, best, opts.patience, clock.seconds)
        if prog["bad"] and prog["stopped"] is None and opts.decay < 1:
            _back_to_best(trained, best, opt, prog, opts.decay)
        ckpt.save(step, prog, {**{f"trained.{n}": p for n, p in trained.items()},
                               **{f"best.{n}": t for n, t in best.items()}, **optimizer_tensors(opt)})
    bar.close()
    with torch.no_grad():
        for n, p in trained.items():
            p.copy_(best[n])
    n_trained = sum(p.numel() for p in trained.values())
    merged = _merged(pm) if opts.train == "lora" else pm
    merged.to(dtype)
    for p in merged.parameters():
        p.requires_grad_(False)
    modules = dict(merged.named_modules())
    for n in names:  # rank 0's merged weights on every rank
        distributed.broadcast(modules[n].weight.data)
    return {"stage": "distill", "options": dataclasses.asdict(opts), "adapted": len(names),
            "trained_params": n_trained, **({"lora_params": n_trained} if opts.train == "lora" else {}),
            "bf16_autocast": bf16, "steps": prog["step"],
            "tokens": prog["step"] * opts.batch * T, "data_sha256": data_sha,
            "heldout_sha256": heldout.sha256(), "heldout_tokens": heldout.tokens, "heldout_kl": prog["curve"],
            "kl_before": prog["curve"][0][1], "kl_after": prog["best"], "best_step": prog["best_step"],
            "train_loss": prog["losses"][-1] if prog["losses"] else None, "lr_last": prog["lr"],
            "stopped": prog["stopped"],
            "seconds": round(clock.seconds, 2), "world_size": distributed.world_size(), **peak_memory(device)}


def _with_lora(model, names: list[str], opts: DistillOptions):
    peft = _peft()
    cfg = peft.LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=0.0, bias="none",
                          target_modules="^(" + "|".join(re.escape(n) for n in names) + ")$")
    return peft.get_peft_model(model, cfg)


def _with_weights(model, names: list[str]):
    """The model itself, with the named linear layers' weights (only) receiving gradients."""
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for n in names:
        modules[n].weight.requires_grad_(True)
    return model


def _merged(pm):
    """The adapters merged into the weights, and no trace of peft left on the model."""
    merged = pm.merge_and_unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(merged):
            delattr(merged, attr)
    return merged


def _back_to_best(trained: dict, best: dict, opt, prog: dict, decay: float):
    """A held-out evaluation that did not improve: the adapters go back to the best ones, at a smaller step (the
    same on every rank, whose evaluations agree)."""
    with torch.no_grad():
        for n, p in trained.items():
            p.copy_(best[n])
    prog["lr"] *= decay
    for g in opt.param_groups:
        g["lr"] = prog["lr"]


def _sha(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
