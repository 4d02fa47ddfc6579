"""Budgets a user has instead of a ratio: a GGUF file size or a llama.cpp speedup on this machine. Each resolves
to the ratio that meets it before any pruning (`resolve`), and is recorded, with what it was derived from and
what the pruned model reached, in pruning.json (`finish`).

With the width search (width_allocation="search"), a ratio and a speedup combine (`with_ratio=True`): the
parameter budget stays exact and the speedup becomes a constraint of the search (it removes as many whole
blocks as the latency table says the speed needs, and allocates the rest of the budget as neurons).

    cfg, target = resolve("model_dir", PruneConfig(), target_size="80MB")
    model, report = prune(model, tokenizer, cfg, target=target)
    save_pretrained(model, tokenizer, out, report)
    finish(out, target)
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import CompruneError
from ..export.gguf import pad_step
from ..export.gguf_quant import QUANT_TYPES
from ..export.latency import latency_table
from ..export.size import gguf_bytes, param_counts, parse_size, weight_bytes
from ..files import read_config
from ..io import MANIFEST, read_manifest, write_manifest
from ..models.adapters import get_adapter
from ..outputs import json_text
from ..skeleton import build_skeleton
from ..stream import resolve_stream_source
from .speed import ratio_for_speedup, settled, speedup_blocks


def ratio_for_size(model_dir, target_bytes: int, qtype: str, ratio_of: str = "all", round_to: int = 1) -> dict:
    """The ratio whose pruned model's `qtype` GGUF is at most `target_bytes`, with what it was derived from.
    The margin of one width quantum per layer covers the rounding of the per-layer neuron counts."""
    model_dir = Path(model_dir)
    dense = gguf_bytes(model_dir, qtype)
    if dense <= target_bytes:
        raise CompruneError(f"the dense model's {qtype} GGUF is {dense / 1e6:.1f} MB, already within "
                            f"--target-size {target_bytes / 1e6:.1f} MB: nothing to prune (ask for a smaller size)")
    total, blocks = param_counts(model_dir)
    cfg = read_config(model_dir)
    margin = int(cfg["num_hidden_layers"]) * 3 * int(cfg["hidden_size"]) * max(1, round_to)
    # a mix's ffn_down may fall back to a larger type once pruned widths no longer fill its blocks: count the
    # savings from the dense model at the pruned types
    start = gguf_bytes(model_dir, qtype, as_pruned=True) if qtype in QUANT_TYPES else dense
    params = math.ceil((start - target_bytes) / weight_bytes(qtype, model_dir)) + margin
    base = blocks if ratio_of == "blocks" else total
    ratio = params / base
    if ratio > 0.9:
        raise CompruneError(f"--target-size {target_bytes / 1e6:.1f} MB needs {ratio:.0%} of the "
                            f"{'blocks' if ratio_of == 'blocks' else 'model'}'s parameters removed (at most 90 %): "
                            f"the dense {qtype} GGUF is {dense / 1e6:.1f} MB; ask for more, or a smaller --size-type")
    return {"requested_bytes": int(target_bytes), "qtype": qtype, "dense_gguf_bytes": dense, "ratio": ratio,
            "params_to_remove": params}


def resolve(model, cfg, *, target_size: int | str | None = None, target_speedup: float | None = None,
            target_type: str = "f16", with_ratio: bool = False, show: bool = True) -> tuple:
    """(configuration to prune with, the target's record or None) for a GGUF size in bytes or as text
    ('80MB', '75MiB') or a llama.cpp generation speedup, at GGUF type `target_type`. `model`: a directory of
    safetensors or an embedded alias; only its shapes are read. `cfg` is not changed: the configuration returned
    has the derived ratio (with_ratio: cfg's ratio, and the speedup as the width search's constraint)."""
    if target_size is None and target_speedup is None:
        return cfg, None
    if target_size is not None and target_speedup is not None:
        raise CompruneError("give one of --target-size, --target-speedup, not several (each decides the ratio)")
    # methods without the width search have no width_allocation option
    if with_ratio and (target_speedup is None or getattr(cfg, "width_allocation", None) != "search"):
        raise CompruneError("--ratio with --target-speedup is a constraint of the width search: add --preset "
                            "comp-search, or give only one of them")
    flag = "--target-size" if target_size is not None else "--target-speedup"
    try:
        src = resolve_stream_source(model)
    except CompruneError:
        raise CompruneError(f"{flag} needs a model directory of safetensors (or 'smollm2'), not '{model}': "
                            "convert it first, or give --ratio") from None
    # the export pads every width with zero neurons to its step: a size budget counts the bytes as written, and a
    # speed budget would pay for zeros that run at the rounded-up width's speed, so both round to that step
    step = pad_step(target_type)
    if cfg.round_to % step:
        cfg = replace(cfg, round_to=math.lcm(cfg.round_to, step))
    if target_size is not None:
        record = {"kind": "target_size",
                  **ratio_for_size(src, parse_size(target_size), target_type, cfg.ratio_of, cfg.round_to)}
    elif with_ratio:
        table = latency_table(src, target_type, threads=torch.get_num_threads(), show=show)
        cfg = replace(cfg, search_speedup=target_speedup, latency={k: table[k] for k in ("c", "a", "m")})
        skeleton = build_skeleton(src, torch.float32, lite=True)
        k, pred = speedup_blocks(skeleton, get_adapter(skeleton), cfg)  # refuses an unreachable target now
        record = {"kind": "target_speedup", "ratio": cfg.ratio, "with_ratio": True, "target": target_speedup,
                  "min_removed_blocks": k, "predicted_at_minimum": pred, "qtype": target_type,
                  "table": {k_: table[k_] for k_ in ("c", "a", "m", "cpu", "threads")}}
    else:
        table = latency_table(src, target_type, threads=torch.get_num_threads(), show=show)
        skeleton = build_skeleton(src, torch.float32, lite=True)  # shapes only: the plan needs no weights
        record = {"kind": "target_speedup",
                  **ratio_for_speedup(skeleton, get_adapter(skeleton), cfg, table, target_speedup)}
    return replace(cfg, ratio=record["ratio"]).validate(), record


def finish(out_dir, record: dict | None) -> dict | None:
    """The target's record as pruning.json holds it once the pruned model is saved in `out_dir`: with what the
    prune decided and, for a size, the real GGUF size of the saved model. A size over its target is refused
    (the margin should prevent it)."""
    if record is None:
        return None
    out = Path(out_dir)
    manifest = read_manifest(out)
    final = settled(record, manifest.get("details", {}))
    if final["kind"] == "target_size":
        got = gguf_bytes(out, final["qtype"])
        final = {**final, "gguf_bytes": got, "met": got <= final["requested_bytes"]}
    final = json.loads(json_text(final))  # as pruning.json holds it (lists, not tuples), to compare
    if manifest.get(final["kind"]) != final:
        # a prune given the target wrote it with its report; the real size is only known from the saved
        # directory (the export's layout read from its files), and a streamed prune writes its report itself,
        # so those add it now
        manifest[final["kind"]] = final
        tmp = out / (MANIFEST + ".tmp")
        write_manifest(tmp, manifest)
        os.replace(tmp, out / MANIFEST)
    if final["kind"] == "target_size" and not final["met"]:
        raise CompruneError(f"the pruned model's {final['qtype']} GGUF is {final['gguf_bytes'] / 1e6:.2f} MB, over "
                            f"--target-size {final['requested_bytes'] / 1e6:.2f} MB: rerun with --ratio "
                            f"{final['ratio'] * final['gguf_bytes'] / final['requested_bytes']:.4f} (and report this)")
    return final


def describe(final: dict) -> str:
    """One line saying what a finished target reached."""
    if final["kind"] == "target_size":
        return (f"GGUF {final['qtype']}: {final['gguf_bytes'] / 1e6:.2f} MB (target {final['requested_bytes'] / 1e6:.2f} "
                f"MB, dense {final['dense_gguf_bytes'] / 1e6:.2f} MB, ratio {final['ratio']:.4f})")
    return (f"llama.cpp generation: {final['predicted']:.2f}x dense predicted (target {final['target']:.2f}x, ratio "
            f"{final['ratio']:.4f}; measure it: comprune compare, or benchmarks/gguf_speed.py)")
