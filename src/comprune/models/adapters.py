"""Where things live in each decoder family. Methods ask an adapter; they never hard-code module names.

A new family is one Adapter (usually a subclass overriding a name or two) plus a tiny-model test.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..errors import CompruneError


@dataclass(frozen=True)
class MLPParts:
    up: nn.Linear            # rows = neurons
    down: nn.Linear          # columns = neurons
    gate: nn.Linear | None   # rows = neurons (gated MLPs only)


class LlamaAdapter:
    """Llama (incl. GQA), and the families that share its module names: Mistral, Qwen2."""
    family = "llama"
    # block(h) = r + mlp(norm(r)) with r = h + attn(norm(h)): the MLP's output is added last, unnormalised
    mlp_output_is_residual = True

    def decoder(self, model) -> nn.Module:
        return model.model

    def layers(self, model) -> nn.ModuleList:
        return model.model.layers

    def set_layers(self, model, layers: list[nn.Module]) -> None:
        model.model.layers = nn.ModuleList(layers)

    def mlp(self, layer) -> MLPParts:
        m = layer.mlp
        return MLPParts(up=m.up_proj, down=m.down_proj, gate=getattr(m, "gate_proj", None))

    def mlp_module(self, layer) -> nn.Module:
        return layer.mlp

    def mlp_input_norm(self, layer) -> nn.Module:
        return layer.post_attention_layernorm

    def attention(self, layer) -> nn.Module:
        return layer.self_attn

    def embeddings(self, model) -> list[nn.Module]:
        return [model.model.embed_tokens, model.model.rotary_emb]

    def head(self, model) -> list[nn.Module]:
        return [model.model.norm, model.lm_head]

    def mlp_act(self, layer):
        return layer.mlp.act_fn


class MistralAdapter(LlamaAdapter):
    family = "mistral"


class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"


ADAPTERS = {"llama": LlamaAdapter, "mistral": MistralAdapter, "qwen2": Qwen2Adapter}


def base_model_type(config) -> str:
    mt = config.model_type
    return mt.removeprefix("comprune_")


def get_adapter(model) -> LlamaAdapter:
    mt = base_model_type(model.config)
    if mt not in ADAPTERS:
        raise CompruneError(f"model type '{model.config.model_type}' is not supported yet: "
                            f"supported families are {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[mt]()
