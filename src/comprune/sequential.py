"""The one driver: walk the decoder blocks in order, one resident at a time, each fed by the blocks before it
(sparsegpt's `llama_sequential`, llm-compressor's sequential pipeline).

A method supplies a plan (its dense analysis passes: block scores, a global ranking, gradients, a width search),
computed once and checkpointed before any block changes, and a per-block step. The driver owns the loop,
residency, progress, checkpoints and resume, so every method resumes: after each block it saves the block's
record, the tensors its step changed and the activations that feed the next one; a resumed run rebuilds the finished blocks from
those (shapes from the record, values from the tensors) and walks on from the first unfinished block, to the
same bytes as an uninterrupted run."""
from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from . import distributed
from .errors import CompruneError
from .surgery import (attention_heads, mlp_width, prune_expert_neurons, prune_experts, prune_heads, prune_mlp,
                      prune_query_heads)
from .walk import IN_MEMORY, IN_PLACE, ActivationStore, Activations, Residency, capture, progress


@dataclass
class Walk:
    """What a method's plan and step see of the run (the config is frozen; the device is the resolved one)."""
    model: object
    adapter: object
    cfg: object
    budget: object
    device: object
    input_ids: torch.Tensor
    show: bool = True
    checkpoint: object = None
    fitness_ids: torch.Tensor | None = None
    residency: Residency = IN_PLACE      # how a module is held while worked on (streaming supplies its own)
    store: ActivationStore = IN_MEMORY   # where activation batches live (files, in a streamed prune)

    @property
    def layers(self):
        return self.adapter.layers(self.model)

    def hold(self, module):
        """The module's tensors on the compute device for the duration (a context manager)."""
        return self.residency.hold(module, self.device)

    def capture(self, input_ids: torch.Tensor | None = None, device=None) -> Activations:
        """Block 0's inputs for the calibration windows (or `input_ids`), in this walk's store: this rank's share of
        them in a process group (comprune.distributed)."""
        ids = self.input_ids if input_ids is None else input_ids
        ids = ids[distributed.window_share(ids.shape[0], self.cfg.batch_size)]
        return capture(self.model, self.adapter, ids, self.cfg.batch_size, self.device if device is None else device,
                       self.store, self.residency.embedding_rows(self.model))

    def without_checkpoint(self) -> "Walk":
        """The same run for an analysis pass inside a plan (a plan is checkpointed whole, not block by block)."""
        return dataclasses.replace(self, checkpoint=None)


def walk_blocks(walk: Walk, acts: Activations | None, step: Callable, plan: Callable | None = None,
                desc: str = "blocks", prepare: Callable | None = None, pack: Callable | None = None,
                unpack: Callable | None = None) -> tuple[dict, dict, object]:
    """Run `step(walk, i, layer, acts, plan, carry) -> (record, acts)` on every block the plan keeps, in order.

    plan(walk, acts) -> (plan dict, acts): the dense analysis, run before any block changes (not again on
    resume); its "removed_layers" are skipped. prepare(walk, plan): model-wide changes the steps rely on (e.g.
    bias slots), made before the walk and again before a resume's replay. carry: a JSON dict the steps may update
    (checkpointed with each block). pack(walk, acts) / unpack(walk, saved) turn the step's activations into the
    Activations a checkpoint holds and back (a method that carries a second stream). Returns (plan, records,
    acts)."""
    layers, ckpt = walk.layers, walk.checkpoint
    to_ckpt = (lambda a: pack(walk, a)) if pack is not None else (lambda a: a)
    from_ckpt = (lambda a: unpack(walk, a)) if unpack is not None else (lambda a: a)
    state = ckpt.load(to_ckpt(acts) if acts is not None else None) if ckpt is not None else None
    _same_start(state)
    if state is None:
        the_plan, acts = plan(walk, acts) if plan is not None else ({}, acts)
        the_plan = distributed.decided(the_plan)  # rank 0's plan (the ranks computed it from the same sums)
        acts = from_ckpt(acts) if acts is not None else None
        start, records, carry = 0, {}, {}
        if prepare is not None:
            prepare(walk, the_plan)
        if ckpt is not None:
            ckpt.save(0, None, {"plan": the_plan, "blocks": {}, "carry": {}})
    else:
        start, saved, details = state
        the_plan, records, carry = details["plan"], details["blocks"], details.get("carry", {})
        acts = from_ckpt(saved) if saved is not None else None
        if prepare is not None:
            prepare(walk, the_plan)
        for i, rec in records.items():
            replay_block(walk.adapter, layers[i], rec, ckpt.load_block_tensors(i) or {})
    removed = set(the_plan.get("removed_layers", ()))
    for i in progress(range(start, len(layers)), desc, walk.show):
        if i in removed:
            continue
        layer = layers[i]
        with walk.hold(layer):
            before = _versions(layer)
            rec, acts = step(walk, i, layer, acts, the_plan, carry)
            changed = _changed(layer, before) if ckpt is not None or distributed.active() else None
            distributed.take_block(layer, rec, changed)  # every rank holds rank 0's block
            if ckpt is not None:  # while resident: a streamed block's values exist only now
                ckpt.save_block_tensors(i, changed)
        records[i] = rec
        if ckpt is not None:
            ckpt.save(i + 1, to_ckpt(acts) if acts is not None else None,
                      {"plan": the_plan, "blocks": records, "carry": carry})
    return the_plan, records, acts


def _same_start(state):
    """Every rank of a group resumes from rank 0's block (a rank that sees no checkpoint, or another one, cannot)."""
    mine = state[0] if state is not None else None
    if distributed.decided(mine) != mine:
        raise CompruneError(f"rank {distributed.rank()} sees another checkpoint than rank 0: put --out (and the "
                            "checkpoint beside it) on storage every rank sees")


def _versions(layer) -> dict:
    """Each tensor of the block as (a weak reference to it, its version): a tensor the step replaced (surgery) or
    wrote in place (a refit, a bias) is no longer the same live object at the same version. Weak, so a replaced
    tensor is freed as the step goes."""
    return {n: (weakref.ref(t), t._version) for n, t in layer.state_dict(keep_vars=True).items()}


def _changed(layer, before: dict) -> dict:
    """The tensors the step changed: what a resume must restore (the others are the model's own)."""
    out = {}
    for n, t in layer.state_dict(keep_vars=True).items():
        ref, version = before.get(n, (None, None))
        if ref is None or ref() is not t or t._version != version:
            out[n] = t.detach()
    return out


@torch.no_grad()
def replay_block(adapter, layer, rec: dict, saved: dict):
    """A finished block rebuilt on resume: its shapes from the record (kept heads, experts, neurons), then the exact
    values of every tensor its step changed, from the checkpoint."""
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    if "kept_kv_heads" in rec and len(rec["kept_kv_heads"]) < attention_heads(adapter, layer)[1]:
        prune_heads(adapter, layer, as_long(rec["kept_kv_heads"]))
    if "kept_query_heads" in rec:
        prune_query_heads(adapter, layer, as_long(rec["kept_query_heads"]))
    if getattr(adapter, "moe", False):
        if "kept_experts" in rec:
            prune_experts(adapter, layer, as_long(rec["kept_experts"]))
        if "kept_neurons" in rec:
            kept = [as_long(k) for k in rec["kept_neurons"]]
            prune_expert_neurons(adapter, layer, kept, [None] * len(kept))
    elif "kept_neurons" in rec and len(rec["kept_neurons"]) < mlp_width(adapter, layer):
        prune_mlp(adapter, layer, as_long(rec["kept_neurons"]))
    state = layer.state_dict()
    for name, value in saved.items():
        target = state[name]
        if target.is_meta:  # a streamed skeleton: the values are in the staged block file already
            continue
        target.copy_(value)
