"""`--dtype auto`: the fastest precision this host computes in, decided at run time.

CPU: bfloat16 only where the CPU multiplies it natively (AMX or AVX512_BF16 in /proc/cpuinfo) and a short
matmul probe on the model's own shapes confirms it beats float32. Elsewhere bfloat16 is emulated: an AVX2-only
EPYC runs a bf16 matmul at ~1 GFLOP/s against ~40 in float32, so there the flags alone decide and bf16 is never
even probed (one such matmul would take a large part of a second). CUDA: bfloat16 where the device supports it,
else float16.

The probe times `tokens x hidden @ hidden x intermediate` (the MLP's up projection, the most common matmul of a
forward; wide ones on a slice of their columns, at most 0.5 GFLOP per matmul) for ~0.1 s per precision and
is cached per process, so every load in a process agrees. Its GFLOP/s is
also the "peak" the evaluator's achieved rate is reported against (`evaluate.hardware`).
"""
from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
PROBE_SHAPE = (128, 576, 1536)  # tokens, hidden, intermediate when the model's own are not known (SmolLM2-135M)
PROBE_SECONDS = 0.1             # per precision; the whole decision stays well under a second
BF16_MARGIN = 1.2               # bf16 must beat float32 by this much to be chosen (its rounding is not free)
PROBE_MAX_FLOP = 5e8            # one probe matmul at most: a CPU that claims bf16 but emulates it (~1 GFLOP/s)
                                # still answers within a second; wide MLPs are probed on a slice of their columns
PROBE_MIN_FLOP = 5e7            # a smaller matmul times the call, not the arithmetic: the two rates are noise, so
                                # two runs of one command could choose differently (and write different bytes);
                                # such a model gains nothing from bf16 and keeps float32
_PROBES: dict = {}


@dataclass
class Choice:
    """What `--dtype auto` chose and why: recorded in every manifest and result JSON."""
    dtype: str
    requested: str = "auto"
    reason: str = ""
    device: str = "cpu"
    probe_shape: list = field(default_factory=list)
    probe_gflops: dict = field(default_factory=dict)
    cpu_flags: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _cpuinfo(key: str) -> str | None:
    """The value of `key` for the first processor in /proc/cpuinfo (None where there is no such file or line)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU feature flags of the first processor in /proc/cpuinfo (empty where there is none)."""
    return frozenset((_cpuinfo("flags") or "").split())


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo; the platform's processor string elsewhere)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def host() -> dict:
    """The machine a result was measured on, and how loaded it was at that moment: every result JSON carries
    one, because the CPU (and so every speed) differs between sessions."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "arch": platform.machine(),
            "native_bf16": native_bf16(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg": load, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def native_bf16(flags=None) -> list[str]:
    """The native-bf16 matmul flags present (empty: bf16 is emulated on this CPU)."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in NATIVE_BF16_FLAGS if f in flags]


def probe_shape(config=None) -> tuple[int, int, int]:
    """(tokens, hidden, intermediate) for the probe, from a config dict or object when given."""
    get = (config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)) if config else None
    if get is None:
        return PROBE_SHAPE
    hidden, inter = get("hidden_size"), get("intermediate_size")
    if isinstance(inter, (list, tuple)):  # per-layer widths (a pruned model): the widest
        inter = max(inter) if inter else None
    if not (isinstance(hidden, int) and isinstance(inter, int) and hidden > 0 and inter > 0):
        return PROBE_SHAPE
    tokens = PROBE_SHAPE[0]
    return (tokens, hidden, max(64, min(inter, int(PROBE_MAX_FLOP // (2 * tokens * hidden)))))


def matmul_gflops(dtype: torch.dtype, shape=PROBE_SHAPE, device="cpu", seconds: float = PROBE_SECONDS) -> float:
    """GFLOP/s of `m x k @ k x n` in `dtype` (best of repeated runs for ~`seconds`), cached per process."""
    device = torch.device(device)
    key = (str(dtype), tuple(shape), str(device), torch.get_num_threads(), seconds)
    if key not in _PROBES:
        _PROBES[key] = measure_gflops(dtype, tuple(shape), device, seconds)
    return _PROBES[key]


def measure_gflops(dtype, shape=PROBE_SHAPE, device="cpu", seconds: float = PROBE_SECONDS) -> float:
    """matmul_gflops without the cache (a benchmark probing before and after its work)."""
    device = torch.device(device)
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        a @ b  # warm-up: kernel selection, packing
        sync()
        best, start = float("inf"), time.perf_counter()
        while True:
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
            if time.perf_counter() - start >= seconds:
                break
    return 2 * m * k * n / best / 1e9


def choose(device="cpu", config=None) -> Choice:
    """The precision `--dtype auto` runs in on `device` for a model with `config` (see the module docstring)."""
    device = torch.device(device)
    shape = list(probe_shape(config))
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return Choice("bfloat16" if bf16 else "float16", reason="CUDA " + ("supports bfloat16" if bf16 else
                      "without bfloat16: float16"), device=str(device))
    if device.type != "cpu":
        return Choice("float32", reason=f"{device.type}: float32", device=str(device))
    flags = native_bf16()
    if not flags:
        return Choice("float32", reason="no AMX or AVX512_BF16 in /proc/cpuinfo: bfloat16 would be emulated",
                      device="cpu", probe_shape=shape)
    flop = 2 * shape[0] * shape[1] * shape[2]
    if flop < PROBE_MIN_FLOP:
        return Choice("float32", reason=f"{'/'.join(flags)}: the model's matmuls are too small for bfloat16 to pay "
                      "off (under the probe's floor): float32 kept", device="cpu", probe_shape=shape,
                      cpu_flags=flags)
    # One thread: when another process shares the cores, a multi-threaded matmul waits at its barrier for the
    # descheduled thread whatever its precision, and both rates collapse to the scheduler's (seen on a 2-core
    # AMX host under load: 29.7 float32 vs 29.0 bfloat16 GFLOP/s, float32 wrongly kept; single-threaded,
    # 150 vs 595). The ratio per core is what the choice needs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = {name: round(matmul_gflops(dt, shape), 1) for name, dt in (("float32", torch.float32),
                                                                           ("bfloat16", torch.bfloat16))}
    finally:
        torch.set_num_threads(threads)
    fast = rates["bfloat16"] >= BF16_MARGIN * rates["float32"]
    # the rates themselves are in probe_gflops: the reason stays the same from run to run
    reason = f"{'/'.join(flags)}: the single-thread bfloat16 matmul probe is " + (
        f"at least {BF16_MARGIN}x float32's" if fast else f"less than {BF16_MARGIN}x float32's: float32 kept")
    return Choice("bfloat16" if fast else "float32", reason=reason, device="cpu", probe_shape=shape,
                  probe_gflops=rates, cpu_flags=flags)


def fixed(dtype: torch.dtype, device="cpu") -> Choice:
    """The record of an explicitly requested precision."""
    name = str(dtype).removeprefix("torch.")
    return Choice(name, requested=name, reason="requested", device=str(torch.device(device)))
