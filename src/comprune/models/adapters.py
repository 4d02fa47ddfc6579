"""Where things live in each decoder family. Methods ask an adapter; they never hard-code module names.

An adapter is the code half of a family, its record in models/families.py the data half (the config keys of
the MLP width and expert count, why heads cannot go, ...): a family whose modules are named as an existing
adapter's needs only a record. What an adapter says: the blocks and their MLP/attention linears, the norm in
front of the MLP, whether the MLP output is the block's last, unnormalised residual add (COMP's fast output
rebuild), config lists that follow the blocks when some are removed, and whether (and why not) attention
heads can go.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn as nn

from ..errors import CompruneError
from . import experts as E
from .fused import SplitLinear, fuse, split

if TYPE_CHECKING:
    from .families import Family


@dataclass(frozen=True)
class MLPParts:
    up: nn.Linear            # rows = neurons
    down: nn.Linear          # columns = neurons
    gate: nn.Linear | None   # rows = neurons (gated MLPs only)


class LlamaAdapter:
    """Llama (incl. GQA), and the families that share its module names: Mistral, Qwen2, Qwen3 (per-head q/k
    norms, which head pruning leaves alone), SmolLM3."""
    # block(h) = r + mlp(norm(r)) with r = h + attn(norm(h)): the MLP's output is added last, unnormalised
    mlp_output_is_residual = True
    per_layer_keys: tuple = ()        # config lists (one entry per block) beyond the common ones, sliced with them
    fused = False                     # q/k/v or gate/up stored as one matrix (split while pruning)
    # Trained with <bos> first in every sequence (Gemma): without it the first text token becomes the attention
    # sink and every statistic and perplexity describes a model off its distribution
    needs_bos = False
    # a norm follows o_proj and down_proj before their residual adds (Gemma's and OLMo 2's post-norms): the
    # refit weighs each token's error by that norm's scale, not the block output's
    output_norms = False

    def __init__(self, spec: Family):
        self.spec = spec

    def windows(self, model, ids):
        """Token windows as the family reads them: where it needs <bos>, each window's first token becomes <bos>
        (the windows keep their length, and their digest is still the text's)."""
        bos = model.config.bos_token_id if self.needs_bos else None
        if bos is None:
            return ids
        ids = ids.clone()
        ids[:, 0] = bos
        return ids

    @property
    def family(self) -> str:
        return self.spec.model_type

    @property
    def width_key(self) -> str:
        """The config field of the MLP width."""
        return self.spec.width_key

    @property
    def moe(self) -> bool:
        """Mixture-of-experts MLPs (MoEAdapter)."""
        return self.spec.moe

    def head_pruning_refusal(self, config) -> str | None:
        """Why attention heads of this model cannot be pruned (None: they can)."""
        return self.spec.head_refusal

    def disk_name(self, name: str) -> str:
        """The checkpoint's name of a state-dict entry of the prepared model (what --stream reads and writes)."""
        return name

    def decoder(self, model) -> nn.Module:
        return model.model

    def layers(self, model) -> nn.ModuleList:
        return self.decoder(model).layers

    def set_layers(self, model, layers: list[nn.Module]) -> None:
        self.decoder(model).layers = nn.ModuleList(layers)

    def mlp(self, layer) -> MLPParts:
        m = layer.mlp
        return MLPParts(up=m.up_proj, down=m.down_proj, gate=getattr(m, "gate_proj", None))

    def mlp_module(self, layer) -> nn.Module:
        return layer.mlp

    def mlp_input_norm(self, layer) -> nn.Module:
        return layer.post_attention_layernorm

    def attention(self, layer) -> nn.Module:
        return layer.self_attn

    def attention_linears(self, layer) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        a = self.attention(layer)
        return a.q_proj, a.k_proj, a.v_proj, a.o_proj

    def embeddings(self, model) -> list[nn.Module]:
        return [model.model.embed_tokens, model.model.rotary_emb]

    def head(self, model) -> list[nn.Module]:
        return [model.model.norm, model.lm_head]

    def mlp_act(self, layer):
        return layer.mlp.act_fn

    def prepare(self, model) -> None:
        """Before pruning: make every prunable unit its own nn.Linear (fused families split theirs)."""

    def restore(self, model) -> None:
        """After pruning: back to the family's own module layout (what its checkpoints hold)."""


class SmolLM3Adapter(LlamaAdapter):
    per_layer_keys = ("no_rope_layers",)  # 1 = the layer uses RoPE; transformers indexes it by layer_idx


class GemmaAdapter(LlamaAdapter):
    """Gemma 2 / 3: four (1 + w) RMSNorms per block. The MLP reads pre_feedforward_layernorm; post_attention_
    layernorm and post_feedforward_layernorm normalise the attention and MLP outputs before their residual adds,
    so the MLP output is not the block's last unnormalised add. Embedding scaling, soft-capping and
    query_pre_attn_scalar live in the modules and config, untouched by pruning; layer_types follows the blocks."""
    mlp_output_is_residual = False
    output_norms = True
    needs_bos = True

    def mlp_input_norm(self, layer) -> nn.Module:
        return layer.pre_feedforward_layernorm


class GraniteAdapter(LlamaAdapter):
    """Granite: Llama's names with scalar multipliers (embedding, residual, attention, logits); the residual
    multiplier scales the MLP output before its add."""
    mlp_output_is_residual = False


class Olmo2Adapter(LlamaAdapter):
    """OLMo 2: norms after attention and MLP only (post_attention_layernorm, post_feedforward_layernorm)."""
    mlp_output_is_residual = False
    output_norms = True


class Phi3Adapter(LlamaAdapter):
    """Phi-3 / Phi-4-mini: fused qkv_proj ([q; k; v] rows) and gate_up_proj ([gate; up] rows), split into
    their parts while pruning (models/fused.py) and fused again after, so slicing stays split-aware."""
    fused = True

    def head_pruning_refusal(self, config) -> str | None:
        rope = getattr(config, "rope_parameters", None) or {}
        if isinstance(rope, dict) and rope.get("rope_type") == "longrope":
            return ("this Phi-3 uses longrope, whose short/long factors are fitted to the full head set: prune "
                    "layers and MLP neurons only (--head-share 0)")
        return None

    def mlp(self, layer) -> MLPParts:
        gu = layer.mlp.gate_up_proj
        if not isinstance(gu, SplitLinear):
            raise CompruneError("Phi-3's gate_up_proj is still fused: call adapter.prepare(model) first")
        return MLPParts(up=gu.parts[1], down=layer.mlp.down_proj, gate=gu.parts[0])

    def mlp_act(self, layer):
        return layer.mlp.activation_fn

    def attention_linears(self, layer):
        a = layer.self_attn
        if not isinstance(a.qkv_proj, SplitLinear):
            raise CompruneError("Phi-3's qkv_proj is still fused: call adapter.prepare(model) first")
        q, k, v = a.qkv_proj.parts
        return q, k, v, a.o_proj

    def prepare(self, model) -> None:
        for layer in self.layers(model):
            a = layer.self_attn
            if not isinstance(a.qkv_proj, SplitLinear):
                hd = a.head_dim
                nq = a.o_proj.in_features // hd
                nkv = (a.qkv_proj.out_features // hd - nq) // 2
                a.qkv_proj = split(a.qkv_proj, [nq * hd, nkv * hd, nkv * hd])
            gu = layer.mlp.gate_up_proj
            if not isinstance(gu, SplitLinear):
                f = gu.out_features // 2
                layer.mlp.gate_up_proj = split(gu, [f, f])

    def restore(self, model) -> None:
        for layer in self.layers(model):
            a = layer.self_attn
            if isinstance(a.qkv_proj, SplitLinear):
                a.qkv_proj = fuse(a.qkv_proj)
            if isinstance(layer.mlp.gate_up_proj, SplitLinear):
                layer.mlp.gate_up_proj = fuse(layer.mlp.gate_up_proj)


class OPTAdapter(LlamaAdapter):
    """OPT: blocks under model.decoder, a non-gated fc1 -> act -> fc2 MLP with biases held by the block itself,
    LayerNorms, learned positions, attention output `out_proj`."""
    mlp_output_is_residual = False

    def decoder(self, model) -> nn.Module:
        return model.model.decoder

    def mlp(self, layer) -> MLPParts:
        return MLPParts(up=layer.fc1, down=layer.fc2, gate=None)

    def mlp_module(self, layer) -> nn.Module:
        # the MLP has no module of its own: a container of its two linears (parameters shared, not registered)
        return _Pair(layer.fc1, layer.fc2)

    def mlp_input_norm(self, layer) -> nn.Module:
        return layer.final_layer_norm

    def attention_linears(self, layer):
        a = layer.self_attn
        return a.q_proj, a.k_proj, a.v_proj, a.out_proj

    def embeddings(self, model) -> list[nn.Module]:
        d = self.decoder(model)
        return [m for m in (d.embed_tokens, d.embed_positions, d.project_in) if m is not None]

    def head(self, model) -> list[nn.Module]:
        d = self.decoder(model)
        if d.project_out is not None or d.final_layer_norm is None:
            return [_Chain(*(m for m in (d.final_layer_norm, d.project_out) if m is not None)), model.lm_head]
        return [d.final_layer_norm, model.lm_head]

    def mlp_act(self, layer):
        return layer.activation_fn


class MoEAdapter(LlamaAdapter):
    """Mixture-of-experts families with transformers 5's 3-D expert tensors under `mlp.experts` and a top-k router
    `mlp.gate` (Qwen3-MoE, Mixtral, OLMoE). While pruning, each layer's experts are an ExpertList of small
    gated MLPs (models/experts.py), stacked back into the 3-D layout after. The config holds one expert count
    and one expert width for all layers, so both stay uniform across layers."""

    @property
    def expert_key(self) -> str:
        """The config field of the expert count."""
        return self.spec.experts.count_key

    def check_supported(self, model) -> None:
        dense = [i for i, layer in enumerate(self.layers(model)) if not self.is_moe_layer(layer)]
        if dense:
            raise CompruneError(f"this {self.family} model mixes dense MLP layers ({dense}) with expert layers, "
                                "which comprune does not prune yet: only models whose every block is "
                                "mixture-of-experts are supported")

    def disk_name(self, name: str) -> str:
        for pattern, repl in _disk_renames(self.spec.experts):
            name = pattern.sub(repl, name)
        return name

    def is_moe_layer(self, layer) -> bool:
        return hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")

    def experts(self, layer) -> E.ExpertList:
        ex = layer.mlp.experts
        if not isinstance(ex, E.ExpertList):
            raise CompruneError(f"{self.family}'s experts are still 3-D tensors: call adapter.prepare(model) first")
        return ex

    def router(self, layer) -> nn.Module:
        return layer.mlp.gate

    def mlp(self, layer) -> MLPParts:
        raise CompruneError(f"{self.family} has mixture-of-experts MLPs, which --method comp (experts, then "
                            "neurons inside them), wanda-sp, magnitude, flap and layer-drop prune: llm-pruner "
                            "prunes one dense MLP per block")

    def prepare(self, model) -> None:
        self.check_supported(model)
        for layer in self.layers(model):
            if not isinstance(layer.mlp.experts, E.ExpertList):
                layer.mlp.experts = E.split(layer.mlp.experts)

    def restore(self, model) -> None:
        for layer in self.layers(model):
            if isinstance(layer.mlp.experts, E.ExpertList):
                layer.mlp.experts = E.stack(layer.mlp.experts)


class _Pair(nn.Module):
    def __init__(self, fc1, fc2):
        super().__init__()
        object.__setattr__(self, "_linears", (fc1, fc2))

    def parameters(self, recurse=True):
        for lin in self._linears:
            yield from lin.parameters()


class _Chain(nn.Sequential):
    pass


@functools.lru_cache(maxsize=None)
def _disk_renames(experts) -> tuple:
    """In-memory names (an ExpertList of gate/up/down projections, the router `mlp.gate`) -> the checkpoint's
    (`experts`' templates), one tensor per expert."""
    parts = (("gate", experts.gate), ("up", experts.up), ("down", experts.down))
    return tuple((re.compile(rf"\.mlp\.experts\.experts\.(\d+)\.{part}_proj\."),
                  "." + disk.replace("{e}", r"\1") + ".") for part, disk in parts) + \
        ((re.compile(r"\.mlp\.gate\."), f".{experts.router}."),)


def base_model_type(config) -> str:
    """The family's model_type of a config (or config dict): comprune's per-layer configs prefix "comprune_"."""
    mt = config.get("model_type", "") if isinstance(config, dict) else config.model_type
    return str(mt).removeprefix("comprune_")


def get_adapter(model) -> LlamaAdapter:
    from .families import family_of  # families imports the adapter classes
    spec = family_of(model.config)
    return spec.adapter(spec)
