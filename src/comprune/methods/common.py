"""Pieces every method shares: the layer stage and per-block neuron bookkeeping (the budget: comprune.budget)."""
from __future__ import annotations

import math

import torch

from .. import distributed
from ..evaluate.perplexity import family_logits, chunked_nll
from ..sequential import walk_blocks
from ..surgery import attention_heads, mlp_width
from ..walk import Activations, BlockInfluence, forward_block, progress


def layer_scores_bi(walk, acts: Activations) -> list[float]:
    """Block influence of every block from one dense pass (`acts` is consumed: about one activation buffer
    alive at a time)."""
    scores = []

    def score(walk, i, layer, acts, plan, carry):
        bi = BlockInfluence()
        acts = forward_block(layer, acts, consume=True, on_batch=bi)  # inputs freed as outputs come
        scores.append(bi.value())
        return None, acts

    walk_blocks(walk.without_checkpoint(), acts, score, desc="layer scores (BI)")
    return scores


@torch.inference_mode()
def layer_scores_loss(walk, acts: Activations, nsamples: int) -> list[float]:
    """Calibration loss increase when block i alone is skipped, on the first `nsamples` windows.
    Keeps every block's inputs for those windows (small), then reruns the tail once per block. In a process
    group, each rank runs those of the windows it holds and the losses are summed over the ranks."""
    model, adapter, input_ids, hold = walk.model, walk.adapter, walk.input_ids, walk.hold
    rows = min(walk.cfg.batch_size, input_ids.shape[0])
    nb = max(1, math.ceil(nsamples / rows))
    first, last = distributed.batch_share(input_ids.shape[0], walk.cfg.batch_size)
    mine = max(0, min(last, nb) - first)  # this rank's batches among the first nb
    sub = Activations([h for h in acts.hidden[:mine]], acts.kwargs[:mine], acts.store)
    layers = adapter.layers(model)
    norm, head = adapter.head(model)
    logit_fn = family_logits(model)  # Gemma's soft-capping, Granite's logits_scaling: the loss the model has
    ids = [b for b in input_ids.split(rows)][first:first + mine]

    def loss_from(i, x):
        for layer in layers[i:]:
            with hold(layer):
                x = forward_block(layer, x)
        with hold(norm), hold(head):
            total, count = 0.0, 0
            for h, y in zip(x.hidden, ids):
                hn = norm(h)[:, :-1].reshape(-1, h.shape[-1])
                # the chunk the recorded prunes were made with: a score's float rounding must not move with
                # the evaluator's chunk size
                total += chunked_nll(hn, y[:, 1:].reshape(-1).to(hn.device), head, chunk=1024,
                                     logit_fn=logit_fn).item()
                count += hn.shape[0]
        total, count = distributed.sum_floats(total, count)
        return total / count

    inputs = [sub]
    x = sub
    for layer in layers:
        with hold(layer):
            x = forward_block(layer, x)
        inputs.append(x)
    base = loss_from(len(layers), inputs[-1])
    scores = []
    for i in progress(range(len(layers)), "layer scores (loss)", walk.show):
        scores.append(loss_from(i + 1, inputs[i]) - base)
    return scores


def choose_layers(scores: list[float], k: int, protect_first: int, protect_last: int) -> list[int]:
    """The k lowest-scoring blocks, never the protected ends."""
    L = len(scores)
    candidates = [i for i in range(protect_first, L - protect_last)]
    candidates.sort(key=lambda i: scores[i])
    return sorted(candidates[:k])


def keep_lowest_removed(score: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Boolean keep mask that drops the n_remove lowest scores (ties broken by index, deterministically)."""
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if n_remove > 0:
        order = torch.sort(score.double(), stable=True).indices
        keep[order[:n_remove]] = False
    return keep


def full_record(adapter, layer) -> dict:
    """Per-block record of an untouched block."""
    width = mlp_width(adapter, layer)
    h, kv = attention_heads(adapter, layer)
    return {"width": width, "kept_neurons": list(range(width)), "heads": h, "kv_heads": kv,
            "kept_kv_heads": list(range(kv))}
