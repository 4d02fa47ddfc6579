"""The search's block variants: every kept block's MLP at a ladder of widths, pruned and refitted once, on disk.

Level l of a block removes l·step neurons, chosen by the walk's structured OBS on the dense inputs of the
layer-pruned model and refitted by its least squares. Greedy OBS is nested, so one run to the deepest level gives
every level's kept set; each level gets its own refit.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ... import distributed
from ...obs import obs_select
from ...refit import BlockStats, dense_cross, refit
from ...walk import collect_stats, forward_block, progress, resident


@dataclass
class Ladder:
    step: int    # neurons per level
    top: int     # highest level


def make_ladder(width: int, cfg) -> Ladder:
    q = max(1, cfg.round_to)
    step = max(q, int(round(width / cfg.search_levels / q)) * q)
    top = min(int(cfg.search_max_share * width + 1e-9), width - max(cfg.min_width, 1)) // step
    return Ladder(step, top)


class Database:
    """The block variants on disk, one safetensors file per block (levels 1..top: kept neuron indices and the
    refitted down_proj weight; level 0 is the dense block). Memory holds one variant at a time, so the
    database may be larger than RAM; a killed build resumes at the first block without a file."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, block: int) -> Path:
        return self.root / f"block{block}.safetensors"

    def has(self, block: int) -> bool:
        return self.path(block).is_file()

    def save(self, block: int, variants: list[tuple[torch.Tensor, torch.Tensor]]):
        tensors = {}
        for level, (idx, w) in enumerate(variants, start=1):
            tensors[f"idx{level}"], tensors[f"w{level}"] = idx.contiguous(), w.contiguous()
        tmp = self.path(block).with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self.path(block))  # a kill leaves no half-written block

    def variant(self, block: int, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(str(self.path(block)), framework="pt") as f:
            return f.get_tensor(f"idx{level}"), f.get_tensor(f"w{level}")


@torch.inference_mode()
def build_database(model, adapter, acts, kept: list[int], ladder: Ladder, cfg, db: Database, show=True,
                   hold=None) -> Database:
    """Every kept block's variants at levels 1..top into `db` (blocks already there are kept). `acts` is
    consumed."""
    layers = adapter.layers(model)
    for i in progress(kept, "COMP search: variants", show):
        layer = layers[i]
        with (hold or (lambda m: resident(m, cfg.device)))(layer):
            if distributed.all_true(db.has(i)):  # built by an interrupted run: only carry the activations on
                acts = forward_block(layer, acts, consume=True)
                continue
            down = adapter.mlp(layer).down
            own = BlockStats(down, cfg.token_weight, normed=adapter.output_norms)
            hooks = own.attach(layer)
            try:
                _, acts = collect_stats(layer, acts, {"down": down}, consume=True)
            finally:
                for h in hooks:
                    h.remove()
            G, W = own.summed().G, down.weight.detach()
            C = dense_cross(G, W)
            order: list[int] = []
            obs_select(G, C, ladder.top * ladder.step, cfg.damp, cfg.chunk, order=order)
            variants = []
            for level in range(1, ladder.top + 1):
                keep = torch.ones(W.shape[1], dtype=torch.bool)
                keep[torch.tensor(order[:level * ladder.step], dtype=torch.long)] = False
                idx = keep.nonzero().flatten()
                variants.append((idx, refit(G, C, idx.to(G.device), cfg.damp).float().cpu()))
            db.save(i, variants)
            del G, C, variants
    return db


@contextmanager
def _narrowed(parts, idx: torch.Tensor, down_weight: torch.Tensor):
    """The MLP cut to neurons `idx`, its down_proj's kept columns refitted, while the context lasts: the
    stitched block runs only its kept neurons' products, as the physically pruned one will."""
    saved = []

    def swap(t: torch.Tensor, data: torch.Tensor):
        saved.append((t, t.data))
        t.data = data

    idx = idx.to(parts.down.weight.device)
    for lin in (parts.gate, parts.up):
        if lin is not None:
            swap(lin.weight, lin.weight.data[idx])
            if lin.bias is not None:
                swap(lin.bias, lin.bias.data[idx])
    swap(parts.down.weight, down_weight.to(parts.down.weight))
    try:
        yield
    finally:
        for t, data in reversed(saved):
            t.data = data
