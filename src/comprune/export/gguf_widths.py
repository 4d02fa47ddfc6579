"""MLP widths as the GGUF file holds them: the model's, checked against its tensors, then padded.

MLP widths in the file can be larger than the model's, padded with zero neurons (zero gate/up rows, zero
down columns: silu(0) * 0 = 0, so the output is unchanged):
- llama.cpp's deci graph drops the whole layer (attention output included) when a layer's width is 0,
  so a removed MLP is written as a width-1 MLP of zeros and the attention half of the layer is kept;
- every width is rounded up to a multiple of PAD_TO (32) by default: llama.cpp's f16 kernels run an odd width
  much slower than the next multiple of 32 (SmolLM2 on an AVX2 CPU: MLPs at 1017 prompt 0.95x / generate
  1.11x the dense model, at 1024 1.22x / 1.21x; benchmarks/results/round_to_amd.md), far more than the
  zero neurons cost; `pad_to=1` writes the exact widths;
- q8_0 and the other quantized types take rows in blocks of 32 (or more), so for them widths are always a
  multiple of 32 and ffn_down (whose rows are as long as the width) is quantized too instead of staying f16;
  the K-quants' blocks of 256 take a width that is no multiple of 256 by llama.cpp's fallback types (Q4_K ->
  Q5_0 ...) unless `pad_to=256` pads it to whole blocks.
"""
from __future__ import annotations

import math

import torch

from ..errors import require
from .gguf_arch import expert_count, expert_names, expert_width, gguf_family, spec_for
from .gguf_hparams import model_family


def ffn_widths(cfg: dict, tensors: dict) -> list[int]:
    """Per-layer MLP widths: `intermediate_sizes` (pruned, non-uniform) or the one width under the family's
    width key (`intermediate_size`)."""
    n_layers = int(cfg["num_hidden_layers"])
    family = model_family(cfg)
    if gguf_family(family).moe:
        return _expert_widths(family, cfg, tensors, n_layers)
    widths = [int(w) for w in cfg.get("intermediate_sizes") or [cfg[gguf_family(family).width_key]] * n_layers]
    require(len(widths) == n_layers, f"config has {len(widths)} intermediate_sizes for {n_layers} layers")
    fused = spec_for(family).fused_mlp
    for i, w in enumerate(widths):
        name = f"model.layers.{i}.mlp.{'gate_up_proj' if fused else 'up_proj'}.weight"
        require(name in tensors, f"tensor {name} missing from the safetensors files")
        rows = tensors[name].shape[0] // (2 if fused else 1)
        require(rows == w, f"layer {i}: config says MLP width {w} but {name} has {rows} rows")
    return widths


def _expert_widths(family: str, cfg: dict, tensors: dict, n_layers: int) -> list[int]:
    """One expert width for all layers (the MoE configs have one), checked against every expert's tensors."""
    width, n_exp = expert_width(family, cfg), expert_count(family, cfg)
    gate, _, _, router = expert_names(family)
    for i in range(n_layers):
        key = f"model.layers.{i}.{router}.weight"
        require(key in tensors, f"tensor {key} missing from the safetensors files")
        require(tensors[key].shape[0] == n_exp, f"layer {i}: config says {n_exp} experts but {key} has "
                                                f"{tensors[key].shape[0]} rows")
    return [width] * n_layers


PAD_TO = 32


def blocked(qtype: str) -> bool:
    """Whether the type quantizes rows in blocks (of 32 or more): every type but f32 and f16."""
    return qtype not in ("f32", "f16")


def pad_step(qtype: str, pad_to: int | None = None) -> int:
    """The multiple every written MLP width is rounded up to (a quantized type's blocks of 32 always)."""
    return math.lcm(PAD_TO if pad_to is None else pad_to, 32 if blocked(qtype) else 1)


def padded_width(width: int, qtype: str, pad_to: int | None = None) -> int:
    """MLP width written to the file (zero neurons added, see the module docstring). A removed MLP is one zero
    neuron (a whole block of 32 for a quantized type), not a padded block: it has no product worth a fast
    kernel."""
    if width == 0:
        return 32 if blocked(qtype) else 1
    step = pad_step(qtype, pad_to)
    return -(-width // step) * step


def pad_mlp(data: torch.Tensor, hf: str, kind: str, width: int) -> torch.Tensor:
    """Add zero neurons up to `width`: rows of gate/up (and their biases), columns of down."""
    if hf == "mlp.down_proj":
        return data if kind == "bias" else torch.nn.functional.pad(data, (0, width - data.shape[1]))
    pad = (0, width - data.shape[0]) if kind == "bias" else (0, 0, 0, width - data.shape[0])
    return torch.nn.functional.pad(data, pad)
