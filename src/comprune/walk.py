"""What the block walk (comprune.sequential) works with: activations, their capture, one block's forward and
its statistics, and residency.

`capture` runs the embeddings once and stops at block 0, keeping its inputs and the keyword arguments
the decoder passes to every block (causal mask, rotary position embeddings). From then on, each block is
run alone on those activations: `forward_block` turns block i's inputs into block i+1's inputs, so at
most two activation buffers of N x T x d are alive, and `collect_stats` hooks a block's linear layers to
accumulate the statistics the importance scores need (Gram matrix, column means and variances).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed
from .errors import CompruneError


class _StopForward(Exception):
    pass


class SpilledBatches:
    """Activation batches kept in one file each instead of in memory (a streamed prune on the CPU), so a block's
    inputs and outputs cost about one batch of RAM instead of N x T x d floats each. Exact (raw bytes, read into
    fresh tensors: no mmap, so file pages never count as the process's memory). A drop-in for the list of
    batches in Activations.hidden: append, index (read back), set to None (deleted), pop, len, iter, slice."""
    _serial = 0

    def __init__(self, directory):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.items: list = []   # (path, shape, dtype), None once consumed

    def append(self, t: torch.Tensor):
        t = t.detach().to("cpu").contiguous()
        SpilledBatches._serial += 1
        path = self.dir / f"batch-{os.getpid()}-{SpilledBatches._serial}.bin"
        with open(path, "wb") as f:
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.items.append((path, tuple(t.shape), t.dtype))

    def _load(self, item) -> torch.Tensor:
        if item is None:
            raise IndexError("this activation batch was already consumed")
        path, shape, dtype = item
        t = torch.empty(shape, dtype=dtype)
        view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise CompruneError(f"activation file {path} is truncated: the disk may be full; free space "
                                        "or prune without --stream")
                done += n
        return t

    def shape(self, i: int) -> tuple:
        return self.items[i][1]

    def dtype(self, i: int) -> torch.dtype:
        return self.items[i][2]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._load(item) for item in self.items[i]]
        return self._load(self.items[i])

    def __setitem__(self, i, value):
        if value is not None:
            raise TypeError("spilled batches are only appended, read and dropped (set to None)")
        if self.items[i] is not None:
            self.items[i][0].unlink(missing_ok=True)
        self.items[i] = None

    def __iter__(self):
        for i in range(len(self.items)):
            yield self[i]

    def pop(self, i: int = 0) -> torch.Tensor:
        t = self[i]
        self[i] = None
        del self.items[i]
        return t

    def __del__(self):
        try:
            for item in self.items:
                if item is not None:
                    item[0].unlink(missing_ok=True)
        except Exception:  # noqa: BLE001 - interpreter shutdown; the store removes the directory anyway
            pass


class ActivationStore:
    """Where activation batches live: in memory (the default), or in files under `directory` (a streamed prune on
    the CPU: RAM then holds about one batch, not N x T x d floats per buffer). Every buffer of a walk comes from
    its activations' store, so the choice travels with the data. As a context manager, it removes the directory
    (and what a killed run left there) around the walk."""

    def __init__(self, directory=None):
        self.dir = Path(directory) if directory is not None else None

    @property
    def spills(self) -> bool:
        return self.dir is not None

    def new(self):
        """An empty list of activation batches."""
        return SpilledBatches(self.dir) if self.dir is not None else []

    def __enter__(self):
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)  # what a killed run left
        return self

    def __exit__(self, *exc):
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        return False


IN_MEMORY = ActivationStore()


def batch_shape(hidden, i: int) -> tuple:
    return hidden.shape(i) if isinstance(hidden, SpilledBatches) else tuple(hidden[i].shape)


@dataclass
class Activations:
    """One block's inputs for every calibration batch, plus the per-batch kwargs the decoder passes blocks, and
    the store new buffers for them come from."""
    hidden: list[torch.Tensor]
    kwargs: list[dict]
    store: ActivationStore = IN_MEMORY

    def clone(self) -> "Activations":
        return Activations([h.clone() for h in self.hidden], self.kwargs, self.store)

    def like(self, hidden) -> "Activations":
        """Other batches with these kwargs and this store."""
        return Activations(hidden, self.kwargs, self.store)

    def take(self) -> "Activations":
        """Move the buffers into a new object and leave this one empty, so the callee holds the only reference
        and each buffer is freed as soon as the callee moves past it."""
        moved = Activations(self.hidden, self.kwargs, self.store)
        self.hidden, self.kwargs = [], []
        return moved

    @property
    def ntokens(self) -> int:
        return sum(batch_shape(self.hidden, i)[0] * batch_shape(self.hidden, i)[1] for i in range(len(self.hidden)))


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
def capture(model, adapter, input_ids: torch.Tensor, batch_size: int, device, store: ActivationStore = IN_MEMORY,
            rows=None) -> Activations:
    """Inputs of block 0 for all calibration windows, without running any block. `rows`: where a streamed
    prune reads the calibration tokens' embedding rows (the table stays on disk)."""
    layers = adapter.layers(model)
    store_hidden, store_kwargs = store.new(), []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw["use_cache"] = False
        for key in ("cache", "past_key_values"):  # transformers 5 calls it cache, 4 past_key_values
            if key in kw:
                kw[key] = None
        store_hidden.append(hidden.detach().to(device))
        store_kwargs.append(_to(kw, device))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    src = model_device(model)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            ids = adapter.windows(model, input_ids[i:i + batch_size].to(src))
            inputs = {"input_ids": ids} if rows is None else {"inputs_embeds": rows.embed(ids)}
            try:
                model.base_model(**inputs, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return Activations(store_hidden, store_kwargs, store)


def block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def forward_block(layer: nn.Module, acts: Activations, check: bool = True, keep: bool = True, consume: bool = False,
                  on_batch=None) -> Activations | None:
    """Run one block on every batch: returns the next block's inputs (None with keep=False: run for hooks).

    consume=True frees each input batch as soon as its output exists (acts is left empty), so the inputs and
    outputs are never both whole: about one activation buffer at the peak instead of two. on_batch(h, y)
    sees every input batch with its output (e.g. block influence) before the input goes."""
    outs = acts.store.new()
    hidden = acts.hidden
    for i, kw in enumerate(acts.kwargs):
        h = hidden[i]
        if consume:
            hidden[i] = None
        y = block_output(layer(h, **kw))
        if check and not torch.isfinite(y).all():
            raise CompruneError("non-finite activations (NaN/Inf) after a block: the model or calibration data is "
                                "broken; try --dtype float32 or other calibration text")
        if on_batch is not None:
            on_batch(h, y)
        del h
        if keep:
            outs.append(y)
    if consume:
        acts.hidden = []
    return acts.like(outs) if keep else None


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

    def add(self, x: torch.Tensor) -> None:
        """Accumulate the moments of rows x [M, n]: float64 sums over row chunks (a bounded float64 copy)."""
        if self.col_sum is None:
            self.col_sum = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            self.col_sqsum = torch.zeros_like(self.col_sum)
        for xc in x.split(256):
            xd = xc.double()
            self.col_sum += xd.sum(0)
            self.col_sqsum += (xd * xd).sum(0)
        self.count += x.shape[0]

    def summed(self) -> "InputStats":
        """The sums over every rank's tokens (comprune.distributed; nothing in one process)."""
        if distributed.active():
            for t in (self.gram, self.col_sum, self.col_sqsum):
                if t is not None:
                    distributed.all_reduce_sum(t)
            self.count = int(distributed.sum_floats(self.count)[0])
        return self


@torch.inference_mode()
def collect_stats(layer: nn.Module, acts: Activations, linears: dict[str, nn.Linear], gram: set[str] = frozenset(),
                  forward: bool = True, keep_outputs: bool = True,
                  consume: bool = False) -> tuple[dict[str, InputStats], Activations | None]:
    """Hook the inputs of `linears` while running the block; returns their stats and the block's outputs
    (None with keep_outputs=False, when the caller takes what it needs from its own hooks). consume=True
    frees the inputs batch by batch (see forward_block)."""
    stats = {name: InputStats(n=lin.in_features) for name, lin in linears.items()}

    def make_hook(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            if not torch.isfinite(x).all():
                raise CompruneError(f"non-finite activations (NaN/Inf) entering {name}: the model or calibration "
                                    "data is broken; check the model loads and evaluates correctly first")
            s = stats[name]
            s.add(x)
            if name in gram:
                # float32 matmul (fast), accumulated in float64 across batches, in place (no float64 temporary)
                g = x.float().T @ x.float()
                s.gram = g.double() if s.gram is None else s.gram.add_(g)
        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in linears.items()]
    try:
        outs = forward_block(layer, acts, keep=keep_outputs, consume=consume) if forward else None
    finally:
        for h in handles:
            h.remove()
    if forward:  # complete: summed over the ranks' tokens (a caller that runs the forward itself sums them)
        for s in stats.values():
            s.summed()
    return stats, outs


class BlockInfluence:
    """BI = 1 - mean over tokens of cos(X_i, X_{i+1}) (ShortGPT): low means the block barely changes the stream.
    Accumulated batch by batch (forward_block's on_batch), so a block's inputs can go as its outputs come."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def __call__(self, a: torch.Tensor, b: torch.Tensor):
        cos = torch.nn.functional.cosine_similarity(a.float().reshape(-1, a.shape[-1]),
                                                    b.float().reshape(-1, b.shape[-1]), dim=-1)
        self.total += cos.double().sum().item()
        self.count += cos.numel()

    def value(self) -> float:
        total, count = distributed.sum_floats(self.total, self.count)
        return 1.0 - total / count


def progress(iterable, desc, enabled=True, total=None):
    return tqdm(iterable, desc=desc, disable=not enabled, total=total, dynamic_ncols=True, leave=False)


class resident:
    """Context manager: move one module to the compute device for the duration, then back (one resident block)."""

    def __init__(self, layer: nn.Module, device):
        self.layer, self.device = layer, torch.device(device)
        self.home = model_device(layer)

    def __enter__(self):
        if self.home != self.device:
            self.layer.to(self.device)
        return self.layer

    def __exit__(self, *exc):
        if self.home != self.device:
            self.layer.to(self.home)
        return False


class Residency:
    """Where a module's tensors are while the walk works on it: in memory, moved to the compute device for the
    duration (this policy). A streamed prune supplies its own (comprune.skeleton.StreamRun: read from disk on
    entry, written back and dropped on exit), and the calibration tokens' embedding rows."""
    streamed = False

    def hold(self, module: nn.Module, device):
        return resident(module, device)

    def embedding_rows(self, model):
        return None


IN_PLACE = Residency()
