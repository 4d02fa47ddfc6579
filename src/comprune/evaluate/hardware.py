"""The evaluator against the hardware: achieved GFLOP/s of a perplexity pass beside the matmul probe's rate.

FLOPs per evaluated token of a forward at window length T (multiply-adds count 2):

    2 * (weights of every nn.Linear: q, k, v, o, gate, up, down of each kept block, and the head)
    + per layer 4 * d_attn * (T + 1) / 2      (Q K^T and attention x V, d_attn = heads x head_dim)

The Linear weights are read from the model itself, so a pruned model's per-layer widths and heads count as
they are. The attention term is the causal work: token t attends to t + 1 positions, (T + 1) / 2 on average
(a kernel that also computes the masked half does twice that). Norms, rotary embeddings, activations, the
softmax and the embedding lookup are left out (a few % at these sizes).

The peak is comprune.precision's probe (`tokens x hidden @ hidden x intermediate` in the precision that ran,
same thread count, best of ~0.5 s of runs), so the fraction says how close the whole evaluator gets to one of
its own matmuls. Both are rates of this process: on a shared CPU they are only comparable when the load was
the same during both.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import precision

FORMULA = ("2 x (all nn.Linear weights incl. the head) + 4 x d_attn x (T+1)/2 per layer (causal attention), "
           "d_attn = heads x head_dim, per token at window length T")


def _attention_width(config) -> int:
    heads = getattr(config, "num_attention_heads", 0) or 0
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    return heads * head_dim


def _layer_attention_widths(model) -> list[int]:
    """heads x head_dim of every kept layer (a pruned model's q_proj says how many query heads are left)."""
    config = model.config
    widths = []
    for name, module in model.named_modules():
        if name.endswith("self_attn.q_proj") and isinstance(module, nn.Linear):
            widths.append(module.out_features)
    return widths or [_attention_width(config)] * getattr(config, "num_hidden_layers", 0)


def flops_per_token(model, seqlen: int) -> float:
    """Forward FLOPs per token at window length `seqlen` (see the module docstring)."""
    seen, linear = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.data_ptr() not in seen:
            seen.add(module.weight.data_ptr())
            linear += module.weight.numel()
    attention = sum(4 * d * (seqlen + 1) / 2 for d in _layer_attention_widths(model))
    return 2 * linear + attention


PEAK_SECONDS = 0.5  # longer than --dtype auto's probe: the best of more runs is steadier on a shared machine


def against_peak(model, tokens_per_second: float, seqlen: int, peak: float | None = None) -> dict:
    """Achieved GFLOP/s of an evaluation at `tokens_per_second`, and its fraction of the probed peak (probed
    here, cached per process, unless given). A fraction above 1 means the probe ran while the CPU was busier
    than during the evaluation: on a shared machine, probe again on a quiet one."""
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    shape = precision.probe_shape(model.config)
    peak = peak or precision.matmul_gflops(dtype, shape, device, seconds=PEAK_SECONDS)
    fpt = flops_per_token(model, seqlen)
    achieved = fpt * tokens_per_second / 1e9
    return {"dtype": str(dtype).removeprefix("torch."), "flops_per_token": round(fpt),
            "achieved_gflops": round(achieved, 2), "peak_gflops": round(peak, 2),
            "fraction_of_peak": round(achieved / peak, 4) if peak else None,
            "peak_probe": {"shape": list(shape), "threads": torch.get_num_threads(), "device": str(device)},
            "attn_implementation": attention_implementation(model), "formula": FORMULA}


def attention_implementation(model) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def use_sdpa(model) -> str | None:
    """Switch eager attention to torch's scaled_dot_product_attention where the model supports it (fused, no
    T x T probabilities kept for the backward that evaluation never runs). Returns the implementation in use."""
    if attention_implementation(model) == "eager" and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, ImportError):  # transformers refuses sdpa for this architecture: keep eager
            pass
    return attention_implementation(model)
