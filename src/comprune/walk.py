"""The sequential, one-block-resident loop (the sparsegpt/gptq driver).

`capture` runs the embeddings once and stops at block 0, keeping its inputs and the keyword arguments
the decoder passes to every block (causal mask, rotary position embeddings). From then on, each block is
run alone on those activations: `forward_block` turns block i's inputs into block i+1's inputs, so at
most two activation buffers of N x T x d are alive, and `collect_stats` hooks a block's linear layers to
accumulate the statistics the importance scores need (Gram matrix, column means and variances).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .errors import CompruneError


class _StopForward(Exception):
    pass


@dataclass
class Activations:
    """One block's inputs for every calibration batch, plus the per-batch kwargs the decoder passes blocks."""
    hidden: list[torch.Tensor]
    kwargs: list[dict]

    def clone(self) -> "Activations":
        return Activations([h.clone() for h in self.hidden], self.kwargs)

    def take(self) -> "Activations":
        """Move the buffers into a new object and leave this one empty, so the callee holds the only reference
        and each buffer is freed as soon as the callee moves past it."""
        moved = Activations(self.hidden, self.kwargs)
        self.hidden, self.kwargs = [], []
        return moved

    @property
    def ntokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def model_device(model) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@torch.inference_mode()
def capture(model, adapter, input_ids: torch.Tensor, batch_size: int, device) -> Activations:
    """Inputs of block 0 for all calibration windows, without running any block."""
    layers = adapter.layers(model)
    store_hidden, store_kwargs = [], []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw["use_cache"] = False
        kw["past_key_values"] = None
        store_hidden.append(hidden.detach().to(device))
        store_kwargs.append(_to(kw, device))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    src = model_device(model)
    # Streaming prune: the embedding table stays on disk and only the calibration tokens' rows are read.
    rows = getattr(model.get_input_embeddings(), "_comprune_rows", None)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[i:i + batch_size].to(src)
            inputs = {"input_ids": ids} if rows is None else {"inputs_embeds": rows.embed(ids)}
            try:
                model.base_model(**inputs, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return Activations(store_hidden, store_kwargs)


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def forward_block(layer: nn.Module, acts: Activations, check: bool = True, keep: bool = True) -> Activations | None:
    """Run one block on every batch: returns the next block's inputs (None with keep=False: run for hooks)."""
    outs = []
    for h, kw in zip(acts.hidden, acts.kwargs):
        y = _block_output(layer(h, **kw))
        if check and not torch.isfinite(y).all():
            raise CompruneError("non-finite activations (NaN/Inf) after a block: the model or calibration data is "
                                "broken; try --dtype float32 or other calibration text")
        if keep:
            outs.append(y)
    return Activations(outs, acts.kwargs) if keep else None


@dataclass
class InputStats:
    """Statistics of the input X [M, n] of one linear layer over the calibration tokens."""
    n: int
    gram: torch.Tensor | None = None     # X^T X, float64
    col_sum: torch.Tensor = None         # sum over tokens, float64
    col_sqsum: torch.Tensor = None       # sum of squares, float64
    count: int = 0
    extra: dict = field(default_factory=dict)

    def mean(self) -> torch.Tensor:
        return self.col_sum / self.count

    def var(self) -> torch.Tensor:
        # Population variance over tokens; clamp guards tiny negative rounding.
        return (self.col_sqsum / self.count - self.mean() ** 2).clamp_min(0)

    def sqnorm(self) -> torch.Tensor:
        return self.col_sqsum


@torch.inference_mode()
def collect_stats(layer: nn.Module, acts: Activations, linears: dict[str, nn.Linear], gram: set[str] = frozenset(),
                  forward: bool = True, keep_outputs: bool = True) -> tuple[dict[str, InputStats], Activations | None]:
    """Hook the inputs of `linears` while running the block; returns their stats and the block's outputs
    (None with keep_outputs=False, when the caller takes what it needs from its own hooks)."""
    stats = {name: InputStats(n=lin.in_features) for name, lin in linears.items()}

    def make_hook(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            if not torch.isfinite(x).all():
                raise CompruneError(f"non-finite activations (NaN/Inf) entering {name}: the model or calibration "
                                    "data is broken; check the model loads and evaluates correctly first")
            s = stats[name]
            if s.col_sum is None:
                s.col_sum = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
                s.col_sqsum = torch.zeros_like(s.col_sum)
            for xc in x.split(256):  # float64 sums over row chunks: a bounded float64 copy, not the whole batch
                xd = xc.double()
                s.col_sum += xd.sum(0)
                s.col_sqsum += (xd * xd).sum(0)
            s.count += x.shape[0]
            if name in gram:
                # float32 matmul (fast), accumulated in float64 across batches, in place (no float64 temporary)
                g = x.float().T @ x.float()
                s.gram = g.double() if s.gram is None else s.gram.add_(g)
        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in linears.items()]
    try:
        outs = forward_block(layer, acts, keep=keep_outputs) if forward else None
    finally:
        for h in handles:
            h.remove()
    return stats, outs


@torch.inference_mode()
def block_influence(x_in: Activations, x_out: Activations) -> float:
    """BI = 1 - mean over tokens of cos(X_i, X_{i+1}) (ShortGPT): low means the block barely changes the stream."""
    total, count = 0.0, 0
    for a, b in zip(x_in.hidden, x_out.hidden):
        cos = torch.nn.functional.cosine_similarity(a.float().reshape(-1, a.shape[-1]),
                                                    b.float().reshape(-1, b.shape[-1]), dim=-1)
        total += cos.double().sum().item()
        count += cos.numel()
    return 1.0 - total / count


def progress(iterable, desc, enabled=True, total=None):
    return tqdm(iterable, desc=desc, disable=not enabled, total=total, dynamic_ncols=True, leave=False)


class resident:
    """Context manager: move one block to the compute device for the duration, then back (one resident block)."""

    def __init__(self, layer: nn.Module, device):
        self.layer, self.device = layer, torch.device(device)
        # Streaming prune (comprune.stream): the block lives in shard files and only exists while resident.
        self.stream = getattr(layer, "_comprune_stream", None)
        self.home = model_device(layer)

    def __enter__(self):
        if self.stream is not None:
            self.stream.materialize(self.device)
            return self.layer
        if self.home != self.device:
            self.layer.to(self.device)
        return self.layer

    def __exit__(self, *exc):
        if self.stream is not None:
            self.stream.release(save=exc[0] is None)
            return False
        if self.home != self.device:
            self.layer.to(self.home)
        return False
