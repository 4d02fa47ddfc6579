"""The latency table behind a budget in speed (`comprune prune --target-speedup 1.5`: llama.cpp generation 1.5x
faster than the dense model's, on this machine; comprune.budget.speed plans against the table).

ZipLM times every module at every width once and sums the table. Here the table is a model of llama.cpp's
per-token generation time, fitted once per architecture, GGUF type, thread count and CPU to variants of the
model itself, timed alternately with its dense export:

    time / dense time = c + a * (layers kept / L) + m * (MLP neurons kept / (L * W))

(c: embeddings, head and per-token overhead; a: one block's attention, norms and per-op cost; m: the MLP's
weights, which generation reads once per token). The variants are the dense weights sliced (MLPs at 3/4, 1/2
and 1/4 of their width; 3/4 and 1/2 of the blocks), so the timing sees the real shapes; their values do not matter to the time.
Attention heads are not in the model: pruning them is predicted to save nothing (conservative).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CompruneError
from ..files import read_config
from ..loading import cache_dir
from ..models.families import family_of
from ..outputs import json_text
from ..precision import cpu_name
from .gguf import export_gguf, open_safetensors
from .llamacpp import relative_llamacpp_speed

NEW_TOKENS, REPEATS = 64, 3
TABLE_VERSION = 2
# what a cached table must hold to be used: the fit, and what a target's record copies from it
FIELDS = ("c", "a", "m", "qtype", "threads", "cpu", "points")


def _key(cfg: dict, qtype: str, threads: int) -> str:
    dims = {k: cfg.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                    "num_key_value_heads", "vocab_size", "head_dim")}
    dims["intermediate_size"] = cfg.get(family_of(cfg).width_key)  # the key's name keeps existing caches valid
    text = json.dumps([dims, qtype, threads, cpu_name(), os.cpu_count(), TABLE_VERSION], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sliced_variant(src: Path, dst: Path, n_layers: int, width: int):
    """A copy of `src` with its first `n_layers` blocks at MLP width `width` (the dense weights sliced)."""
    cfg = read_config(src)
    tensors = open_safetensors(src)
    out = {}
    for name, lazy in tensors.items():
        parts = name.split(".")
        if ".layers." in name and int(parts[2]) >= n_layers:
            continue
        t = lazy.load()
        if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            t = t[:width]
        elif name.endswith("mlp.down_proj.weight"):
            t = t[:, :width]
        out[name] = t.contiguous()
    dst.mkdir(parents=True)
    save_file(out, str(dst / "model.safetensors"))
    cfg = {**cfg, "num_hidden_layers": n_layers, family_of(cfg).width_key: width}
    cfg.pop("intermediate_sizes", None)
    (dst / "config.json").write_text(json_text(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)


def fit(points: list[tuple[float, float, float]]) -> dict:
    """(c, a, m) from (layer fraction, neuron fraction, relative time) points with the dense model's (1, 1, 1):
    least squares under c + a + m = 1, every coefficient at least 0 (timing noise must not make a block or a
    neuron cost negative time)."""
    # substitute c = 1 - a - m: t - 1 = a (l - 1) + m (n - 1)
    A = torch.tensor([[l - 1.0, n - 1.0] for l, n, _ in points], dtype=torch.float64)
    b = torch.tensor([t - 1.0 for _, _, t in points], dtype=torch.float64)
    a, m = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.flatten().tolist()
    a, m = max(a, 0.0), max(m, 0.0)
    if a + m > 1:
        a, m = a / (a + m), m / (a + m)
    return {"c": max(1 - a - m, 0.0), "a": a, "m": m}


def cached_table(path: Path) -> dict | None:
    """The table cached in `path`, or None when there is none or it cannot be used (unreadable, not JSON, a field
    missing or not a finite number): a cache is disposable, so such a table is measured again."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(table, dict) or not all(k in table for k in FIELDS) or not isinstance(table["points"], list):
        return None
    if not all(isinstance(table[k], (int, float)) and not isinstance(table[k], bool) and math.isfinite(table[k])
               for k in "cam"):
        return None
    return table


def latency_table(src, qtype: str = "f16", threads: int | None = None, show: bool = True, refresh: bool = False,
                  prompt: list[int] | None = None) -> dict:
    """The fitted table for the model in directory `src`, measured once and cached (COMPRUNE_CACHE)."""
    src = Path(src)
    cfg = read_config(src)
    family = family_of(cfg)
    if family.no_gguf:
        raise CompruneError(f"--target-speedup is a speed in llama.cpp, which cannot run this model "
                            f"({family.no_gguf}): give --ratio or --target-size")
    threads = threads or torch.get_num_threads()
    path = cache_dir() / "latency" / f"{_key(cfg, qtype, threads)}.json"
    if not refresh:
        table = cached_table(path)
        if table is not None:
            return table
        if path.exists() and show:
            print(f"latency table: {path} is unreadable or incomplete: measuring it again", flush=True)
    table = measure_table(src, cfg, family.width_key, qtype, threads, show, prompt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json_text(table, indent=1))
    os.replace(tmp, path)
    return table


def measure_table(src: Path, cfg: dict, width_key: str, qtype: str, threads: int, show: bool,
                  prompt: list[int] | None) -> dict:
    """Time the sliced variants against the dense export in llama.cpp and fit the table (minutes)."""
    L, W = int(cfg["num_hidden_layers"]), int(cfg[width_key])
    names = open_safetensors(src)
    if not all(f"model.layers.0.mlp.{p}_proj.weight" in names for p in ("gate", "up", "down")):
        raise CompruneError("--target-speedup models Llama-style MLPs (gate/up/down projections): give --ratio "
                            "for this family")
    q = lambda w: max(32, int(round(w / 32)) * 32)  # noqa: E731  (kernel-friendly widths)
    variants = [(L, q(W * 3 / 4)), (L, q(W / 2)), (L, q(W / 4)), (max(1, L * 3 // 4), W), (max(1, L // 2), W)]
    prompt = prompt or list(range(1, 65))
    points, runs = [], []
    with tempfile.TemporaryDirectory(prefix="comprune-latency-") as d:
        d = Path(d)
        dense = export_gguf(src, d / "dense.gguf", qtype)["path"]
        for i, (n, w) in enumerate(variants):
            if show:
                print(f"latency table: timing {n}/{L} blocks at MLP width {w}/{W} in llama.cpp ({qtype}, "
                      f"{threads} threads)", flush=True)
            sliced_variant(src, d / f"v{i}", n, w)
            path_v = export_gguf(d / f"v{i}", d / f"v{i}.gguf", qtype)["path"]
            rec = relative_llamacpp_speed(path_v, dense, prompt, new_tokens=NEW_TOKENS, repeats=REPEATS,
                                          threads=threads)
            points.append((n / L, n * w / (L * W), 1.0 / rec["gen_relative"]))
            runs.append({"layers": n, "width": w, **rec})
            shutil.rmtree(d / f"v{i}")
            os.unlink(path_v)
    return {**fit(points), "layers": L, "width": W, "qtype": qtype, "threads": threads, "cpu": cpu_name(),
            "points": points, "runs": runs, "version": TABLE_VERSION}
