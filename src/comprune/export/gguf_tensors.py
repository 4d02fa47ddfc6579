"""GGUF tensors: the safetensors a model directory holds, checked against its config, and yielded under
llama.cpp's names in llama.cpp's order (Q/K permuted for NORM-rope archs, MLPs padded, experts stacked)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import require
from ..files import check_tensors_match
from .gguf_arch import expert_count, expert_names, gguf_family, spec_for, transform
from .gguf_hparams import head_dim, layer_heads, model_family, rope_settings
from .gguf_widths import pad_mlp

GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def expected_shapes(cfg: dict, widths: list[int]) -> dict:
    """Tensor name -> shape that config.json implies (biases optional)."""
    hidden, vocab, hd = int(cfg["hidden_size"]), int(cfg["vocab_size"]), head_dim(cfg)
    family = model_family(cfg)
    spec, moe = spec_for(family), gguf_family(family).moe
    out = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
           "lm_head.weight": (vocab, hidden)}
    for i, (w, (nh, nkv)) in enumerate(zip(widths, layer_heads(cfg))):
        p = f"model.layers.{i}."
        norms = [n for n in spec.layer_names if n.endswith("layernorm")]
        out.update({p + f"{n}.weight": (hidden,) for n in norms})
        if spec.qk_norm:
            qn, kn = (hd, hd) if spec.qk_norm == "head" else (nh * hd, nkv * hd)
            out.update({p + "self_attn.q_norm.weight": (qn,), p + "self_attn.k_norm.weight": (kn,)})
        out.update({p + "self_attn.o_proj.weight": (hidden, nh * hd), p + "self_attn.o_proj.bias": (hidden,),
                    p + "mlp.down_proj.weight": (hidden, w), p + "mlp.down_proj.bias": (hidden,)})
        if "self_attn.qkv_proj" in spec.layer_names:
            out[p + "self_attn.qkv_proj.weight"] = ((nh + 2 * nkv) * hd, hidden)
        else:
            out.update({p + "self_attn.q_proj.weight": (nh * hd, hidden), p + "self_attn.q_proj.bias": (nh * hd,),
                        p + "self_attn.k_proj.weight": (nkv * hd, hidden), p + "self_attn.k_proj.bias": (nkv * hd,),
                        p + "self_attn.v_proj.weight": (nkv * hd, hidden), p + "self_attn.v_proj.bias": (nkv * hd,)})
        if moe:
            gate, up, down, router = expert_names(family)
            n_exp = expert_count(family, cfg)
            out[p + f"{router}.weight"] = (n_exp, hidden)
            for e in range(n_exp):
                out.update({p + f"{gate.format(e=e)}.weight": (w, hidden), p + f"{up.format(e=e)}.weight": (w, hidden),
                            p + f"{down.format(e=e)}.weight": (hidden, w)})
            for k in [k for k in out if k.startswith(p + "mlp.down_proj")]:
                del out[k]
        elif spec.fused_mlp:
            out[p + "mlp.gate_up_proj.weight"] = (2 * w, hidden)
        else:
            out.update({p + "mlp.gate_proj.weight": (w, hidden), p + "mlp.gate_proj.bias": (w,),
                        p + "mlp.up_proj.weight": (w, hidden), p + "mlp.up_proj.bias": (w,)})
    return out


def check_shapes(cfg: dict, tensors: dict, widths: list[int], where) -> None:
    """Every tensor llama.cpp will read has the shape the config (and so the GGUF header) says: a wrong one
    would give a file llama.cpp refuses to load. Unknown tensors are refused too."""
    want = expected_shapes(cfg, widths)
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    optional = {k for k in want if k.endswith(".bias")} | {"lm_head.weight"}
    check_tensors_match(want, found, where, optional=optional)


class _Lazy:
    """One safetensors tensor, read only when needed so big models are not loaded whole."""

    def __init__(self, handle, name):
        self.handle, self.name = handle, name
        self.shape = tuple(handle.get_slice(name).get_shape())

    def load(self) -> torch.Tensor:
        return self.handle.get_tensor(self.name).float()


def open_safetensors(model_dir: Path) -> dict:
    files = sorted(model_dir.glob("*.safetensors"))
    require(bool(files), f"{model_dir} has no *.safetensors weights (save the model with safetensors)")
    tensors = {}
    for f in files:
        handle = safe_open(str(f), framework="pt")
        for name in handle.keys():
            tensors[name] = _Lazy(handle, name)
    return tensors


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotates half-vectors; llama.cpp's llama/deci rope rotates adjacent pairs: reorder rows per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: dict) -> torch.Tensor:
    """Per-frequency divisors of Llama 3.x rope scaling, which llama.cpp reads from `rope_freqs.weight`."""
    rope, dim = rope_settings(cfg), head_dim(cfg)
    freqs = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def has_output(tensors: dict, cfg: dict) -> bool:
    """Whether the file holds `output.weight` (else llama.cpp uses token_embd as the output matrix too)."""
    tied = cfg.get("tie_word_embeddings") or "lm_head.weight" not in tensors
    return not tied or spec_for(model_family(cfg)).output_required


def gguf_tensors(tensors: dict, cfg: dict, arch: str, widths: list[int]):
    """Yield (gguf name, float32 tensor) in llama.cpp order: globals, then each block."""
    heads = layer_heads(cfg)
    family = model_family(cfg)
    spec, moe = spec_for(family), gguf_family(family).moe
    hd = head_dim(cfg)
    permute = spec.permute_qk or arch == "deci"  # NORM-rope archs rotate adjacent pairs: reorder HF's halves
    for hf, name in GLOBAL_NAMES.items():
        if hf == "lm_head" and (cfg.get("tie_word_embeddings") or "lm_head.weight" not in tensors):
            if spec.output_required:
                yield "output.weight", tensors["model.embed_tokens.weight"].load()
            continue  # tied: llama.cpp reuses token_embd
        require(f"{hf}.weight" in tensors, f"tensor {hf}.weight missing from the safetensors files")
        yield f"{name}.weight", transform(family, hf, "weight", tensors[f"{hf}.weight"].load(), cfg, hd)
    if rope_settings(cfg)["rope_type"] == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(cfg)
    for i, width in enumerate(widths):
        n_head, n_kv = heads[i]
        for hf, name in spec.layer_names.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{hf}.{kind}"
                if key not in tensors:
                    require(kind == "bias", f"tensor {key} missing from the safetensors files")
                    continue
                data = transform(family, hf, kind, tensors[key].load(), cfg, hd)
                if hf == "mlp.gate_up_proj":  # [gate; up]: each half padded on its own
                    data = torch.cat([pad_mlp(h, "mlp.up_proj", kind, width) for h in data.chunk(2)])
                elif hf.startswith("mlp."):
                    data = pad_mlp(data, hf, kind, width)
                if permute and hf == "self_attn.q_proj":
                    data = permute_qk(data, n_head)
                elif permute and hf == "self_attn.k_proj":
                    data = permute_qk(data, n_kv)
                yield f"blk.{i}.{name}.{kind}", data
        if moe:
            yield from _expert_tensors(tensors, cfg, family, i, width)


def _expert_tensors(tensors: dict, cfg: dict, family: str, i: int, width: int):
    """A layer's router (ffn_gate_inp) and its experts stacked as llama.cpp's ffn_{gate,up,down}_exps."""
    gate, up, down, router = expert_names(family)
    p = f"model.layers.{i}."
    yield f"blk.{i}.ffn_gate_inp.weight", tensors[p + f"{router}.weight"].load()
    n_exp = expert_count(family, cfg)
    for hf, name, kind in ((gate, "ffn_gate_exps", "mlp.gate_proj"), (up, "ffn_up_exps", "mlp.up_proj"),
                           (down, "ffn_down_exps", "mlp.down_proj")):
        yield f"blk.{i}.{name}.weight", torch.stack(
            [pad_mlp(tensors[p + f"{hf.format(e=e)}.weight"].load(), kind, "weight", width) for e in range(n_exp)])
