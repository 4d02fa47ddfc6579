"""Every decoder family comprune prunes, one `Family` record each: a new family is one `register_family` call.

A record holds the facts about a family that are data: its adapter (where the modules live, models/adapters.py),
the transformers classes comprune's per-layer-width classes derive from, the config keys of its MLP width and
expert count, llama.cpp's layout for it (or why llama.cpp cannot run it), whether the plain-PyTorch streaming
modules (models/lite.py) compute it, the config flags that give its linears biases, and why its attention heads
cannot be pruned (or what its config requires of their number). Every other module reads these records; none keeps a table of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CompruneError
from . import modeling_comprune as M
from .adapters import (GemmaAdapter, GraniteAdapter, LlamaAdapter, MoEAdapter, Olmo2Adapter, OPTAdapter, Phi3Adapter,
                       SmolLM3Adapter, base_model_type)

# llama.cpp's tensor names (after "blk.N.") of each HF per-layer module (after "model.layers.N.")
ATTN = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output"}
MLP = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
LLAMA = {"input_layernorm": "attn_norm", **ATTN, "post_attention_layernorm": "ffn_norm", **MLP}
QK_NORM = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
GEMMA = {"input_layernorm": "attn_norm", **ATTN, "post_attention_layernorm": "post_attention_norm",
         "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm", **MLP}
GEMMA_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


@dataclass(frozen=True)
class GGUFLayout:
    """How llama.cpp holds the family (following its convert_hf_to_gguf.py)."""
    arch: str                       # llama.cpp's arch for uniform widths
    layer_names: dict               # HF per-layer suffix -> llama.cpp tensor name (after "blk.N.")
    permute_qk: bool = True         # llama.cpp rotates adjacent pairs (NORM rope): reorder HF's half-split rows
    per_layer: bool = False         # may fall back to `deci` for per-layer widths / heads
    qk_norm: str | None = None      # "head": q_norm/k_norm of head_dim; "full": over the whole projection
    norm_plus_one: bool = False     # Gemma's (1 + w) RMSNorm: llama.cpp multiplies by the stored weight
    fused_mlp: bool = False         # Phi-3: gate_up_proj is written fused as ffn_up
    extra_norms: tuple = field(default=())  # per-layer norms beyond the Llama pair
    output_required: bool = False   # llama.cpp reads output.weight even when tied (written as a copy)
    expert_norm: bool | None = None  # llama.cpp's fixed renormalisation of the top-k weights (None: the config's)


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts family's config key of the expert count, and where its saved checkpoint keeps an
    expert's projections and the router (after "model.layers.N."; `{e}`: the expert's index). transformers 5
    stacks the experts into 3-D tensors on load and writes them back one tensor per expert."""
    count_key: str = "num_experts"
    gate: str = "mlp.experts.{e}.gate_proj"
    up: str = "mlp.experts.{e}.up_proj"
    down: str = "mlp.experts.{e}.down_proj"
    router: str = "mlp.gate"

    @property
    def names(self) -> tuple[str, str, str, str]:
        return self.gate, self.up, self.down, self.router


@dataclass(frozen=True)
class Lite:
    """What the plain-PyTorch modules (models/lite.py) must do beyond the Llama arithmetic to match the family's
    transformers class."""
    qkv_bias: bool = False          # q/k/v always carry biases (Qwen2), whatever the config says
    sliding_window: bool = False    # the config's sliding_window applies to every layer (Mistral)


@dataclass(frozen=True)
class Family:
    model_type: str                 # transformers' model_type (comprune's per-layer configs add "comprune_")
    adapter: type                   # the adapter class (models/adapters.py)
    # dotted paths of the transformers config and causal-LM classes that comprune's per-layer-width classes
    # derive from (models/modeling_comprune.py); None: no per-layer variant (MoE: one expert width per config)
    transformers: tuple[str, str] | None = None
    width_key: str = "intermediate_size"  # the config field of the MLP (or expert) width
    experts: Experts | None = None  # mixture-of-experts MLPs
    gguf: GGUFLayout | None = None
    no_gguf: str | None = None      # why llama.cpp cannot run the family (gguf is None)
    lite: Lite | None = None        # None: streamed through transformers' classes
    bias_flags: dict | None = None  # config flags that give the linears biases (FLAP's bias compensation)
    head_refusal: str | None = None  # why attention heads cannot be pruned (None: they can)
    # the transformers config refuses hidden_size % num_attention_heads != 0 even with an explicit head_dim (the
    # check predates head_dim): such a pruned model needs comprune's per-layer config, which checks head_dim
    heads_divide_hidden: bool = False

    @property
    def moe(self) -> bool:
        return self.experts is not None


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make `family` known to every part of comprune (adapters, per-layer classes, GGUF export, streaming)."""
    FAMILIES[family.model_type] = family
    if family.transformers is not None:
        M.add_family(family.model_type, *family.transformers, family.width_key)
        M.register(family.model_type)
    return family


def unregister_family(model_type: str) -> None:
    family = FAMILIES.pop(model_type)
    if family.transformers is not None:
        M.remove_family(model_type)


def family_of(config_or_model_type) -> Family:
    """The record of a config, config dict or model_type (plain or "comprune_"-prefixed)."""
    given = config_or_model_type
    mt = given.removeprefix("comprune_") if isinstance(given, str) else base_model_type(given)
    if mt not in FAMILIES:
        shown = given if isinstance(given, str) else getattr(given, "model_type", mt)
        raise CompruneError(f"model type '{shown}' is not supported yet: "
                            f"supported families are {', '.join(sorted(FAMILIES))}")
    return FAMILIES[mt]


def _hf(module: str, config: str, model: str) -> tuple[str, str]:
    """transformers' own classes of a family, from their module under transformers.models."""
    return (f"transformers.models.{module}.configuration_{module}.{config}",
            f"transformers.models.{module}.modeling_{module}.{model}")


LLAMA_BIASES = {"attention": "attention_bias", "mlp": "mlp_bias"}
GEMMA_LAYOUT = GGUFLayout("gemma2", GEMMA, permute_qk=False, norm_plus_one=True, extra_norms=GEMMA_NORMS)

for _family in (
    Family("llama", LlamaAdapter, _hf("llama", "LlamaConfig", "LlamaForCausalLM"),
           gguf=GGUFLayout("llama", LLAMA, per_layer=True), lite=Lite(), bias_flags=LLAMA_BIASES,
           heads_divide_hidden=True),
    Family("mistral", LlamaAdapter, _hf("mistral", "MistralConfig", "MistralForCausalLM"),
           gguf=GGUFLayout("llama", LLAMA, per_layer=True), lite=Lite(sliding_window=True)),
    Family("qwen2", LlamaAdapter, _hf("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
           gguf=GGUFLayout("qwen2", LLAMA, permute_qk=False, per_layer=True), lite=Lite(qkv_bias=True)),
    Family("qwen3", LlamaAdapter, _hf("qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
           gguf=GGUFLayout("qwen3", {**LLAMA, **QK_NORM}, permute_qk=False, qk_norm="head")),
    Family("smollm3", SmolLM3Adapter, _hf("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM"),
           gguf=GGUFLayout("smollm3", LLAMA)),
    Family("gemma2", GemmaAdapter, _hf("gemma2", "Gemma2Config", "Gemma2ForCausalLM"), gguf=GEMMA_LAYOUT,
           heads_divide_hidden=True),
    Family("gemma3_text", GemmaAdapter, _hf("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM"),
           gguf=GGUFLayout("gemma3", {**GEMMA, **QK_NORM}, permute_qk=False, qk_norm="head", norm_plus_one=True,
                           extra_norms=GEMMA_NORMS),
           heads_divide_hidden=True),
    Family("granite", GraniteAdapter, _hf("granite", "GraniteConfig", "GraniteForCausalLM"),
           gguf=GGUFLayout("granite", LLAMA), bias_flags=LLAMA_BIASES),
    Family("olmo2", Olmo2Adapter, _hf("olmo2", "Olmo2Config", "Olmo2ForCausalLM"),
           gguf=GGUFLayout("olmo2", {**ATTN, **QK_NORM, "post_attention_layernorm": "post_attention_norm",
                                     "post_feedforward_layernorm": "post_ffw_norm", **MLP},
                           permute_qk=False, qk_norm="full", extra_norms=("post_feedforward_layernorm",),
                           output_required=True),
           head_refusal="OLMo 2's q_norm/k_norm normalise over all heads together, so removing a head changes the "
                        "others: prune layers and MLP neurons only (--head-share 0; flap and llm-pruner keep every "
                        "head here)"),
    Family("phi3", Phi3Adapter, _hf("phi3", "Phi3Config", "Phi3ForCausalLM"),
           gguf=GGUFLayout("phi3", {"input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv",
                                    "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                                    "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
                           permute_qk=False, fused_mlp=True)),
    Family("opt", OPTAdapter, _hf("opt", "OPTConfig", "OPTForCausalLM"), width_key="ffn_dim",
           no_gguf="llama.cpp has no OPT architecture", bias_flags={"all": "enable_bias"},
           head_refusal="OPT computes head_dim as hidden_size / num_attention_heads, so a model with fewer heads "
                        "cannot be described by its config: prune layers and MLP neurons only (--head-share 0)"),
    Family("qwen3_moe", MoEAdapter, width_key="moe_intermediate_size", experts=Experts(),
           gguf=GGUFLayout("qwen3moe", {**NORMS, **ATTN, **QK_NORM}, permute_qk=False, qk_norm="head",
                           expert_norm=True)),
    Family("mixtral", MoEAdapter, experts=Experts("num_local_experts", "block_sparse_moe.experts.{e}.w1",
                                                  "block_sparse_moe.experts.{e}.w3",
                                                  "block_sparse_moe.experts.{e}.w2", "block_sparse_moe.gate"),
           gguf=GGUFLayout("llama", {**NORMS, **ATTN}, expert_norm=True)),
    Family("olmoe", MoEAdapter, experts=Experts(),
           gguf=GGUFLayout("olmoe", {**NORMS, **ATTN, **QK_NORM}, permute_qk=False, qk_norm="full",
                           expert_norm=False),
           head_refusal="OLMoE's q_norm/k_norm normalise over all heads together, so removing a head changes the "
                        "others: prune layers, experts and their neurons only (--head-share 0)"),
):
    register_family(_family)
