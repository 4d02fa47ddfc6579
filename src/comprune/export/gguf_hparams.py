"""GGUF hyperparameters: the keys llama.cpp reads for every family (context, widths, heads, head sizes, RoPE,
norm eps, vocabulary, file type), and the config facts they and the tensors are built from. The keys only some
families have are gguf_arch.add_family_hparams."""
from __future__ import annotations

import gguf

from ..errors import CompruneError, require
from .gguf_arch import gguf_family, rope_dims
from .gguf_quant import QUANT_TYPES

# qtype -> (tensor type for 2-D weights, GGUF file type)
QTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    **QUANT_TYPES,  # llama.cpp's quantizer and its per-tensor mix (gguf_quant)
}


def model_family(cfg: dict) -> str:
    family = str(cfg.get("model_type", "")).removeprefix("comprune_")
    gguf_family(family)  # refuses families llama.cpp cannot run
    return family


def layer_heads(cfg: dict) -> list[tuple[int, int]]:
    """(query heads, KV heads) of every layer: per-layer lists when heads were pruned unevenly."""
    n = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    heads = cfg.get("num_attention_heads_per_layer") or [n_head] * n
    kv = cfg.get("num_key_value_heads_per_layer") or [n_kv] * n
    require(len(heads) == n and len(kv) == n, f"config has per-layer head counts for {len(heads)}/{len(kv)} of "
                                              f"{n} layers")
    return [(int(h), int(k)) for h, k in zip(heads, kv)]


def rope_settings(cfg: dict) -> dict:
    """Rope settings as one dict: transformers 5 uses `rope_parameters`, older ones `rope_theta` + `rope_scaling`."""
    rope = dict(cfg.get("rope_parameters") or {})
    rope.update(cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def add_hparams(writer, cfg: dict, arch: str, widths: list[int], qtype: str) -> None:
    n_layers = len(widths)
    heads = layer_heads(cfg)
    n_head, n_kv = heads[0]
    writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(n_layers)
    if arch == "deci":
        # deci reads these per layer
        writer.add_feed_forward_length(widths)
        writer.add_head_count([h for h, _ in heads])
        writer.add_head_count_kv([k for _, k in heads])
    else:
        writer.add_feed_forward_length(widths[0])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
    if gguf_family(model_family(cfg)).moe:
        writer.add_expert_feed_forward_length(widths[0])
    writer.add_key_length(head_dim(cfg))
    writer.add_value_length(head_dim(cfg))
    family = model_family(cfg)
    writer.add_rope_dimension_count(rope_dims(family, cfg, head_dim(cfg)))
    rope = rope_settings(cfg)
    if family in ("gemma3_text", "gemma2"):
        pass  # per layer type: gguf_arch.add_family_hparams
    elif rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] not in ("default", "llama3"):  # llama3 is carried by the rope_freqs tensor
        raise CompruneError(f"GGUF export does not support rope_type '{rope['rope_type']}'")
    if family not in ("gemma3_text", "gemma2"):
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(cfg["vocab_size"]))
    writer.add_file_type(QTYPES[qtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
