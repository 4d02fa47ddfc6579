"""Plain-PyTorch Llama-family decoder for streamed prunes: the same module names and the same arithmetic as
transformers' Llama, Mistral and Qwen2 classes (sdpa attention; the families whose record has `lite`), without
importing transformers' modeling code.

Why: a streamed prune holds one block at a time, so the process's fixed cost dominates on small models, and
importing any transformers model class pulls in its whole modeling stack (torch.distributed.tensor,
torch._dynamo, sympy, scipy: ~130 MB resident) - a quarter of SmolLM2's weights. These modules compute the
calibration passes bit for bit like transformers' (tests/test_lite.py compares every block's output and the
streamed prune's weights with the in-memory one's); the config stays transformers' own config object.

Covers what calibration needs: full causal attention without padding (no mask, no KV cache), RoPE types
whose frequencies do not depend on the sequence length, SiLU MLPs. `supports()` says when that holds;
otherwise the stream falls back to transformers' classes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# transformers' RoPE tables and class-name table only: no modeling code behind either
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .families import FAMILIES
from .modeling_comprune import MODEL_NAMES


def base_type(config) -> str:
    return config.model_type.removeprefix("comprune_")


def _bias(config, part: str) -> bool:
    """Whether the family's config flag for `part` ("attention", "mlp") gives those linears biases."""
    flag = (FAMILIES[base_type(config)].bias_flags or {}).get(part)
    return bool(getattr(config, flag, False)) if flag else False


def supports(config, seqlen: int) -> str | None:
    """None when the lite modules compute exactly what transformers' would on `seqlen`-token windows, else why not."""
    family = FAMILIES.get(base_type(config))
    if family is None or family.lite is None:
        return f"model type {config.model_type}"
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        return f"activation {config.hidden_act}"
    rope = getattr(config, "rope_parameters", None) or {}
    if not isinstance(rope, dict) or "rope_theta" not in rope or \
            rope.get("rope_type", "default") in ("dynamic", "longrope"):
        return "RoPE parameters that change with the sequence length"
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return "sliding-window layers"
    window = getattr(config, "sliding_window", None) if family.lite.sliding_window else None
    if window is not None and window < seqlen:
        return "a sliding window shorter than the calibration windows"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    return None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        rope = config.rope_parameters
        self.rope_type = rope.get("rope_type", "default")
        if self.rope_type == "default":
            dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            self.attention_scaling = 1.0
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(hidden_states, n_rep: int):
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int, n_heads: int, n_kv: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = n_heads // max(n_kv, 1)
        self.scaling = self.head_dim ** -0.5
        o_bias = _bias(config, "attention")  # as each family's transformers class
        qkv_bias = FAMILIES[base_type(config)].lite.qkv_bias or o_bias
        d = config.hidden_size
        self.q_proj = nn.Linear(d, n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d, bias=o_bias)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        query, key = (query * cos) + (rotate_half(query) * sin), (key * cos) + (rotate_half(key) * sin)
        # transformers' sdpa path: native GQA when there is no mask, repeated KV heads otherwise
        sdpa_kwargs = {}
        if self.num_key_value_groups > 1:
            if attention_mask is None and key.shape[-1] == value.shape[-1] <= 256:
                sdpa_kwargs["enable_gqa"] = True
            else:
                key = repeat_kv(key, self.num_key_value_groups)
                value = repeat_kv(value, self.num_key_value_groups)
        q_length = query.shape[2]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             scale=self.scaling, is_causal=q_length > 1 and attention_mask is None,
                                             **sdpa_kwargs)
        out = out.reshape(out.shape[0], -1, q_length, value.shape[-1]).transpose(1, 2).contiguous()
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), None


class MLP(nn.Module):
    def __init__(self, config, width: int):
        super().__init__()
        self.hidden_size, self.intermediate_size = config.hidden_size, width
        bias = _bias(config, "mlp")
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, width: int, n_heads: int, n_kv: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = Attention(config, layer_idx, n_heads, n_kv)
        self.mlp = MLP(config, width)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states, position_embeddings=position_embeddings,
                                          attention_mask=attention_mask)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class DecoderModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        n = config.num_hidden_layers
        widths = getattr(config, "intermediate_sizes", None) or [config.intermediate_size] * n
        heads = getattr(config, "num_attention_heads_per_layer", None) or [config.num_attention_heads] * n
        kv = getattr(config, "num_key_value_heads_per_layer", None) or [config.num_key_value_heads] * n
        self.padding_idx = getattr(config, "pad_token_id", None)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(DecoderLayer(config, i, int(widths[i]), int(heads[i]), int(kv[i]))
                                    for i in range(n))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        """Final hidden states of windows without padding (calibration: no mask, no cache)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(hidden_states, attention_mask=None, position_embeddings=position_embeddings,
                                  position_ids=position_ids)
        return self.norm(hidden_states)


class CausalLM(nn.Module):
    """What a prune touches of a transformers *ForCausalLM: `.model`, `.lm_head`, `.config`, tying, and the name
    of the transformers class the pruned checkpoint is for (`architecture`, set by surgery.finalize_config)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.architecture = class_name(config)
        self.generation_config = None

    @property
    def base_model(self):
        return self.model

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def tie_weights(self):
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def can_generate(self) -> bool:
        return True

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        return self.lm_head(self.model(input_ids=input_ids, inputs_embeds=inputs_embeds))


def class_name(config) -> str:
    """The transformers class AutoModelForCausalLM would build for `config` (what the in-memory path saves)."""
    if config.model_type.startswith("comprune_"):
        return MODEL_NAMES[base_type(config)]
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]


def build(config, dtype: torch.dtype) -> CausalLM:
    """The model with its parameters on the meta device (the stream materialises them block by block) and its
    buffers (RoPE frequencies) real, on the CPU."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as transformers' from_config(dtype=...): RoPE frequencies stay float32
    try:
        with torch.device("meta"):
            model = CausalLM(config)
        model.model.rotary_emb = RotaryEmbedding(config)  # a real buffer: never streamed
    finally:
        torch.set_default_dtype(previous)
    model.tie_weights()
    return model.eval()
