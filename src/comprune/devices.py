"""Where and in what precision a prune computes: device and dtype names, GPU choice and fit."""
from __future__ import annotations

import torch

from . import deferred, precision
from .errors import CompruneError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype, device="cpu", config=None) -> torch.dtype:
    """A torch dtype from a name; "auto" (or None) is the fastest precision of `device` (comprune.precision)."""
    return resolve_precision(dtype, device, config)[0]


def resolve_precision(dtype, device="cpu", config=None) -> tuple[torch.dtype, precision.Choice]:
    """(torch dtype, the record of how it was chosen) for a dtype name, "auto" or None, or a choice already made
    (a resumed run's)."""
    if isinstance(dtype, precision.Choice):
        return _DTYPES[dtype.dtype], dtype
    if isinstance(dtype, torch.dtype):
        return dtype, precision.fixed(dtype, device)
    if dtype in (None, "auto"):
        choice = precision.choose(device if isinstance(device, torch.device) else resolve_device(device), config)
        return _DTYPES[choice.dtype], choice
    if dtype not in _DTYPES:
        raise CompruneError(f"unknown dtype '{dtype}': use one of auto, float32, float16, bfloat16")
    return _DTYPES[dtype], precision.fixed(_DTYPES[dtype], device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CompruneError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CompruneError(f"device '{device}' requested but no CUDA GPU is available: use --device cpu")
    return dev


def pick_device(device: str | None) -> str:
    """'auto' with several GPUs: the one with the most free memory (accelerate's get_max_memory)."""
    if device in (None, "auto") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        free = {k: v for k, v in deferred.get_max_memory()().items() if isinstance(k, int)}
        return f"cuda:{max(free, key=free.get)}"
    return device or "cpu"


def check_device_memory(device: torch.device, block_bytes: int, act_bytes: int):
    """One block, its pruned copy, two activation buffers and the scores' workspace must fit on the GPU."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    need = 2 * block_bytes + 2 * act_bytes
    if need > free:
        raise CompruneError(f"{device} has {free / 2**30:.1f} GiB free but one block needs ~{need / 2**30:.1f} GiB "
                            "(block, its pruned copy, activations): lower --nsamples or --calib-batch-size, or use "
                            "--device cpu")
