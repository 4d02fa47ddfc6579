"""Per-family GGUF layout: llama.cpp's arch, tensor names, Q/K permutation, and the family's own keys and
tensor transforms, following llama.cpp's convert_hf_to_gguf.py for each family.

llama.cpp reads one MLP width and one head count for all layers in every arch but `deci` (DeciLM /
Nemotron-NAS, Llama layout), so only the Llama-layout families export per-layer widths; the others need the
same width and heads in every kept layer (COMP's uniform allocation gives that).
"""
from __future__ import annotations

import math
import gguf
import torch

from ..errors import CompruneError
from ..models.families import FAMILIES, Family, GGUFLayout

def gguf_family(family: str) -> Family:
    """The record of a family llama.cpp runs (refused with the reason otherwise)."""
    record = FAMILIES.get(family)
    if record is not None and record.no_gguf:
        raise CompruneError(f"GGUF export: {record.no_gguf}; keep the safetensors (transformers runs them)")
    if record is None or record.gguf is None:
        supported = sorted(t for t, f in FAMILIES.items() if f.gguf is not None)
        raise CompruneError(f"GGUF export supports {', '.join(supported)} models, not model_type '{family}'")
    return record


def spec_for(family: str) -> GGUFLayout:
    return gguf_family(family).gguf


def expert_count(family: str, cfg: dict) -> int:
    return int(cfg.get(FAMILIES[family].experts.count_key) or cfg.get("num_local_experts") or 0)


def expert_names(family: str) -> tuple[str, str, str, str]:
    """Where the saved checkpoint keeps an expert's gate, up and down projections and the router."""
    return FAMILIES[family].experts.names


def expert_width(family: str, cfg: dict) -> int:
    return int(cfg[FAMILIES[family].width_key])


def pick_arch(family: str, widths: list[int], heads: list | None = None) -> str:
    spec = spec_for(family)
    uniform = len(set(widths)) == 1 and widths[0] > 0 and not (heads and len(set(heads)) > 1)
    if uniform:
        return spec.arch
    if spec.per_layer:
        return "deci"  # per-layer widths / head counts: llama.cpp's deci arch reads them per layer
    raise CompruneError(f"GGUF export: this {family} model has per-layer MLP widths or head counts ({_short(widths)}),"
                        f" which llama.cpp supports only in its `deci` arch (Llama layout), not in `{spec.arch}`: "
                        "prune with the same width in every layer (COMP's default uniform allocation) or keep the "
                        "safetensors")


def _short(widths):
    return f"{min(widths)}..{max(widths)}" if widths else "-"


def check_family_config(family: str, cfg: dict) -> None:
    """What llama.cpp hard-codes for a family and a pruned model may no longer match: refuse with the reason."""
    n = int(cfg["num_hidden_layers"])
    if family == "smollm3":
        want = [int((i + 1) % 4 != 0) for i in range(n)]  # llama.cpp: every 4th layer without RoPE, fixed
        if [int(x) for x in cfg.get("no_rope_layers") or want] != want:
            raise CompruneError("GGUF export: llama.cpp's smollm3 arch skips RoPE in every 4th layer, but this model's "
                                f"no_rope_layers is {cfg.get('no_rope_layers')} (blocks were removed out of step): "
                                "keep the safetensors, or prune without removing whole layers")
    if family == "phi3" and (cfg.get("rope_parameters") or {}).get("rope_type") not in (None, "default"):
        raise CompruneError("GGUF export of Phi-3 supports the default RoPE only (no longrope factors yet)")
    spec = spec_for(family)
    if FAMILIES[family].moe and family != "mixtral" and spec.expert_norm is not None \
            and bool(cfg.get("norm_topk_prob", False)) != spec.expert_norm:
        raise CompruneError(f"GGUF export: llama.cpp's {spec.arch} {'always' if spec.expert_norm else 'never'} "
                            f"renormalises the top-k expert weights, but this model has norm_topk_prob="
                            f"{cfg.get('norm_topk_prob')}: keep the safetensors")
    if family == "olmoe" and int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]) != \
            int(cfg["num_attention_heads"]):
        raise CompruneError("GGUF export: llama.cpp's olmoe arch sizes k_norm by the hidden size, i.e. as many KV heads "
                            "as query heads (OLMoE's own layout), which this model does not have: keep the safetensors")
    if family == "gemma2":
        pattern = [t == "sliding_attention" for t in cfg.get("layer_types") or []]
        if pattern and pattern != [i % 2 == 0 for i in range(n)]:
            raise CompruneError("GGUF export: llama.cpp's gemma2 arch alternates sliding and global layers, but "
                                "removed blocks broke that pattern here: keep the safetensors")


def rope_dims(family: str, cfg: dict, head_dim: int) -> int:
    if family == "phi3":  # partial RoPE: only the first partial_rotary_factor of each head rotates
        factor = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        return int(head_dim * float(factor))
    return head_dim


def gemma_rope(cfg: dict) -> tuple[dict, dict]:
    """(global, sliding) RoPE settings of Gemma 3 (per layer type) or Gemma 2 (one)."""
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" in rope:
        return rope["full_attention"], rope.get("sliding_attention", rope["full_attention"])
    return rope, rope


def add_family_hparams(writer, family: str, cfg: dict) -> None:
    """Keys beyond the Llama set (the caller writes context, widths, heads, head sizes, RMS eps, vocabulary)."""
    if family in ("gemma3_text", "gemma2"):
        full, local = gemma_rope(cfg)
        writer.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
        if family == "gemma3_text":
            writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
        if full.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(full["factor"]))
        elif full.get("rope_type", "default") != "default":
            raise CompruneError(f"GGUF export does not support rope_type '{full.get('rope_type')}' for {family}")
        if cfg.get("sliding_window"):
            writer.add_sliding_window(int(cfg["sliding_window"]))
        for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                         ("final_logit_softcapping", writer.add_final_logit_softcapping)):
            if cfg.get(key):
                add(float(cfg[key]))
            elif family == "gemma2":  # llama.cpp's gemma2 always soft-caps (50 / 30 when unset): cap far out
                add(1e6)
    if family == "granite":
        writer.add_embedding_scale(float(cfg.get("embedding_multiplier", 1.0)))
        writer.add_residual_scale(float(cfg.get("residual_multiplier", 1.0)))
        writer.add_attention_scale(float(cfg.get("attention_multiplier", 1.0)))
        writer.add_logit_scale(float(cfg.get("logits_scaling", 1.0)))
    if family == "phi3" and cfg.get("sliding_window"):
        writer.add_sliding_window(int(cfg["sliding_window"]))
    if FAMILIES[family].moe:
        writer.add_expert_count(expert_count(family, cfg))
        writer.add_expert_used_count(int(cfg["num_experts_per_tok"]))


def is_norm(hf: str) -> bool:
    return hf.endswith("norm") or hf.endswith("layernorm") or hf == "model.norm"


def transform(family: str, hf: str, kind: str, data: torch.Tensor, cfg: dict, head_dim: int) -> torch.Tensor:
    """A tensor as llama.cpp expects it for this family (before the Q/K permutation)."""
    spec = spec_for(family)
    if spec.norm_plus_one and kind == "weight" and is_norm(hf):
        data = data + 1  # Gemma's RMSNorm scales by (1 + w)
    # llama.cpp scales Gemma's attention scores by 1/sqrt(head_dim), transformers by 1/sqrt(query_pre_attn_scalar):
    # fold the ratio into the queries (q_norm's weight for Gemma 3, whose q_proj output is normalised; q_proj for 2)
    qpas = cfg.get("query_pre_attn_scalar")
    if qpas and family in ("gemma3_text", "gemma2") and float(qpas) != float(head_dim):
        target = "self_attn.q_norm" if family == "gemma3_text" else "self_attn.q_proj"
        if hf == target:
            data = data * math.sqrt(head_dim / float(qpas))
    return data
