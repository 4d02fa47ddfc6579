"""The one home of the process group: a prune run by several processes (torchrun, or any launcher that set up
`torch.distributed`) and a no-op in one process, so the walk and the methods call the same functions either way.

Each rank calibrates on its share of the windows, whole batches of them (`batch_share`), and keeps its own
activations. Every statistic a method decides on is summed as raw sums with their token counts (`all_reduce_sum`),
so it equals the one-process statistic up to the order of the sum, however the windows are split (not averaged
per rank, which is exact only for equal shares; not left per rank, which prunes from 1/R of the data). Rank 0
decides and the others take its decision (`decided`, `broadcast`), so every rank holds the same model after every
block; only rank 0 writes (`is_writer`).

The group comes from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or is whatever the
caller initialised; gloo on CPU, NCCL when the prune computes on CUDA. `COMPRUNE_RANK_SHARES` (relative weights,
e.g. "3,1") gives ranks unequal shares of the batches (hosts of unequal speed); by default they are as equal as
the batches allow.

Recovery (fine-tuning after the prune) runs data-parallel through `data_parallel(module)` (DistributedDataParallel
in a group, the module itself in one process) or, for a hand-written loop, `all_reduce_gradients(module, tokens)`;
the recovery stages (comprune.recover) split each step's windows by `part` and sum their gradients and held-out
KL over the ranks.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import CompruneError

SHARES_ENV = "COMPRUNE_RANK_SHARES"


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this process writes outputs and checkpoints (rank 0, or the only process)."""
    return rank() == 0


TIMEOUT_ENV = "COMPRUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 6 * 3600.0


def backend() -> str | None:
    return dist.get_backend() if active() else None


def init(device=None) -> bool:
    """Join the group torchrun described in the environment (gloo, or NCCL when `device` is CUDA), unless one is
    initialised already; True when this process is one of several ranks."""
    if dist.is_available() and dist.is_initialized():
        return active()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise CompruneError("WORLD_SIZE > 1 but this torch has no torch.distributed: run one process")
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" then means this rank's GPU
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=_timeout()))
    return active()


def _timeout() -> float:
    """Seconds a collective waits for the slowest rank. Rank 0 alone resolves a --target-size or --target-speedup
    budget and the other ranks wait at the next broadcast, which can outlast torch's 30-minute default on a slow
    host; a rank that dies ends the group through torchrun anyway, so the wait is long by default."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if value <= 0:
        raise CompruneError(f"{TIMEOUT_ENV}={text!r}: use a positive number of seconds")
    return value


def describe() -> dict:
    """The group's record for pruning.json ({} in one process)."""
    if not active():
        return {}
    return {"world_size": world_size(), "backend": backend(), "shares": shares_env()}


def shares_env() -> list[float] | None:
    text = os.environ.get(SHARES_ENV)
    if not text:
        return None
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != world_size() or any(w <= 0 for w in weights):
        raise CompruneError(f"{SHARES_ENV}={text!r} must be {world_size()} positive weights, one per rank "
                            "(e.g. 3,1): fix or unset it")
    return weights


def batch_counts(n_batches: int, ranks: int, weights: list[float] | None = None) -> list[int]:
    """Batches per rank: proportional to `weights` (equal by default), at least one each, largest remainders
    first, summing to n_batches."""
    weights = weights or [1.0] * ranks
    if n_batches < ranks:
        raise CompruneError(f"{n_batches} calibration batches cannot be shared by {ranks} ranks: pass more "
                            "--nsamples, a smaller --batch-size, or run fewer processes")
    exact = [n_batches * w / sum(weights) for w in weights]
    counts = [int(e) for e in exact]
    order = sorted(range(ranks), key=lambda r: (-(exact[r] - int(exact[r])), r))
    for r in order[:n_batches - sum(counts)]:
        counts[r] += 1
    for r in range(ranks):  # every rank runs at least one batch: taken from the largest share
        if counts[r] == 0:
            counts[max(range(ranks), key=lambda q: counts[q])] -= 1
            counts[r] = 1
    return counts


def batch_share(n_windows: int, batch_size: int) -> tuple[int, int]:
    """(first, last) batch of this rank among the ceil(n_windows / batch_size) batches one process would run:
    whole batches, so every batch's own sums are the one-process ones and only the sum over batches changes
    order."""
    n_batches = -(-n_windows // batch_size)
    if not active():
        return 0, n_batches
    counts = batch_counts(n_batches, world_size(), shares_env())
    first = sum(counts[:rank()])
    return first, first + counts[rank()]


def window_share(n_windows: int, batch_size: int) -> slice:
    """This rank's windows (see batch_share)."""
    first, last = batch_share(n_windows, batch_size)
    return slice(first * batch_size, min(last * batch_size, n_windows))


def part(n: int) -> slice:
    """This rank's part of n items that one step shares out (a recovery step's windows): as the shares weigh the
    ranks when n allows one each, else one for each of the first n ranks and none for the rest."""
    if not active():
        return slice(0, n)
    if n < world_size():
        return slice(min(rank(), n), min(rank() + 1, n))
    counts = batch_counts(n, world_size(), shares_env())
    first = sum(counts[:rank()])
    return slice(first, first + counts[rank()])


def _on_comm_device(t: torch.Tensor) -> torch.Tensor:
    want = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")
    return t if t.device == want else t.to(want)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks, in place (every rank gets the same bits); `t` itself in one process."""
    if not active():
        return t
    buf = _on_comm_device(t.contiguous())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    if buf is not t:
        t.copy_(buf)
    return t


def sum_floats(*values: float) -> list[float]:
    """Python numbers (sums, token counts) summed over the ranks, in float64."""
    if not active():
        return list(values)
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every rank."""
    if not active():
        return flag
    return sum_floats(float(bool(flag)))[0] == world_size()


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s values into `t` on every rank, in place."""
    if not active():
        return t
    buf = _on_comm_device(t.detach().contiguous())
    dist.broadcast(buf, src=src)
    if buf is not t:
        with torch.no_grad():
            t.copy_(buf)
    return t


def decided(obj):
    """Rank 0's `obj` (any picklable value: a plan, a record, a choice) on every rank: rank 0 decides."""
    if not active():
        return obj
    box = [obj if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=_on_comm_device(torch.empty(0)).device)
    return box[0]


def barrier():
    if active():
        dist.barrier()


def take_block(layer, record, tensors: dict) -> None:
    """After a block's step: every rank takes rank 0's decision for it (its record and the tensors the step
    changed). Ranks that computed another decision from the same reduced statistics have diverged: an error."""
    if not active():
        return
    if repr(decided(record)) != repr(record):  # repr: a NaN in a record equals itself
        raise CompruneError(f"rank {rank()} decided otherwise than rank 0 on the same statistics: the ranks "
                            "diverged; run them with the same torch, dtype and device")
    for name in sorted(tensors):
        broadcast(tensors[name])


def data_parallel(module: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """`module` wrapped in DistributedDataParallel inside a group (gradients averaged over the ranks after
    each backward: feed every rank batches of the same number of tokens), the module itself in one process."""
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel
    dev = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None, **kwargs)


def all_reduce_gradients(module: torch.nn.Module, tokens: float | None = None) -> float:
    """For a hand-written data-parallel loop: every parameter's .grad summed over the ranks. With `tokens`
    (this rank's loss tokens, the backward having run on the loss *summed* over them) the gradients become the
    mean over all ranks' tokens, exact for unequal shares; returns the total token count (or the world size)."""
    total = sum_floats(float(tokens))[0] if tokens is not None else float(world_size())
    for p in module.parameters():
        if p.grad is not None:
            all_reduce_sum(p.grad)
            if tokens is not None:
                p.grad.div_(total)
    return total
