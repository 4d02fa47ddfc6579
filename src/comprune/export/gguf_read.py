"""A GGUF file the export wrote, read back as the model directory's weights: every quantized tensor dequantized
(gguf-py's dequantizers) and undone into transformers' layout (Q/K permutation, zero padding, stacked experts,
fused halves), so transformers runs exactly the weights llama.cpp runs. This measures what a quantized export
costs in quality (benchmarks/frontier.py) and checks llama.cpp against it (tests/test_quant.py).

    model = comprune.load("pruned/")[0]
    load_dequantized(model, "pruned/", "pruned-q4_k_m.gguf")
"""
from __future__ import annotations

from pathlib import Path

import gguf
import torch

from ..errors import require
from .gguf import prepare
from .gguf_arch import expert_count, expert_names, spec_for, transform
from .gguf_hparams import head_dim, layer_heads, model_family
from .gguf_tensors import open_safetensors


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of gguf_tensors.permute_qk."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized_weights(model_dir, gguf_path) -> dict[str, torch.Tensor]:
    """transformers' name -> float32 tensor for every 2-D (and expert) weight of the GGUF file `gguf_path`
    exported from `model_dir`, in the model directory's shapes. A tied head that llama.cpp reads as its own
    `output.weight` comes back as `lm_head.weight`."""
    model_dir = Path(model_dir)
    cfg, arch, tensors, widths, _ = prepare(model_dir, "f32")
    family = model_family(cfg)
    spec, hd, heads = spec_for(family), head_dim(cfg), layer_heads(cfg)
    permute = spec.permute_qk or arch == "deci"
    back = {name: hf for hf, name in spec.layer_names.items()}
    out = {}
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        if len(t.shape) < 2 or not t.name.endswith(".weight"):
            continue
        data = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32").copy())
        data = data.reshape(*reversed([int(n) for n in t.shape]))
        if t.name == "token_embd.weight":
            out["model.embed_tokens.weight"] = data
            continue
        if t.name == "output.weight":
            out["lm_head.weight"] = data
            continue
        _, i, name, _ = t.name.split(".")
        i = int(i)
        p, width = f"model.layers.{i}.", widths[i]
        if name.endswith("_exps"):
            gate, up, down, _ = expert_names(family)
            hf = {"ffn_gate_exps": gate, "ffn_up_exps": up, "ffn_down_exps": down}[name]
            for e in range(expert_count(family, cfg)):
                w = data[e][:, :width] if name == "ffn_down_exps" else data[e][:width]
                out[p + f"{hf.format(e=e)}.weight"] = w
            continue
        if name == "ffn_gate_inp":
            continue  # the router stays f32: the model's own
        hf = back[name]
        if hf == "mlp.gate_up_proj":
            data = torch.cat([h[:width] for h in data.chunk(2)])
        elif hf == "mlp.down_proj":
            data = data[:, :width]
        elif hf.startswith("mlp."):
            data = data[:width]
        if permute and hf == "self_attn.q_proj":
            data = _unpermute(data, heads[i][0])
        elif permute and hf == "self_attn.k_proj":
            data = _unpermute(data, heads[i][1])
        if hf == "self_attn.q_proj":  # undo a scale the export folds in (Gemma 2's query scaling)
            ones = torch.ones(1, 1)
            data = data / transform(family, hf, "weight", ones, cfg, hd)
        out[p + f"{hf}.weight"] = data
    # a removed MLP (written as a zero neuron) may be absent from the model
    out = {k: v for k, v in out.items() if k in tensors or k == "lm_head.weight"}
    for k, v in out.items():
        if k in tensors:
            require(tuple(v.shape) == tuple(tensors[k].shape), f"{gguf_path}: {k} reads back as {tuple(v.shape)}, "
                                                               f"the model has {tuple(tensors[k].shape)}")
    return out


@torch.no_grad()
def load_dequantized(model: torch.nn.Module, model_dir, gguf_path) -> torch.nn.Module:
    """`model` (loaded from `model_dir`) with the GGUF file's dequantized weights in place of its own."""
    weights = dequantized_weights(model_dir, gguf_path)
    params = dict(model.named_parameters(remove_duplicate=False))
    lm_head = weights.pop("lm_head.weight", None)
    for name, w in weights.items():
        require(name in params, f"{gguf_path}: the model has no parameter {name}")
        params[name].copy_(w.to(params[name].dtype))
    if lm_head is not None:
        head = model.get_output_embeddings()
        if head.weight is model.get_input_embeddings().weight:  # tied in the model, not in the file
            head.weight = torch.nn.Parameter(lm_head.to(head.weight.dtype), requires_grad=False)
        else:
            head.weight.copy_(lm_head.to(head.weight.dtype))
    return model


def save_dequantized(model_dir, gguf_path, out_dir) -> Path:
    """A copy of `model_dir` whose safetensors hold the GGUF file's dequantized weights (every layout the
    checkpoint has, MoE experts included, reloads as the original does); a head llama.cpp reads as its own
    `output.weight` is untied."""
    import json
    import shutil

    from safetensors.torch import save_file
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    weights = dequantized_weights(model_dir, gguf_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, t in open_safetensors(model_dir).items():
        state[name] = weights.pop(name, None) if name in weights else t.load()
    state.update(weights)  # the untied head
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.endswith(".safetensors.index.json"):
            shutil.copy2(f, out_dir / f.name)
    if "lm_head.weight" in weights:
        cfg = json.loads((out_dir / "config.json").read_text())
        cfg["tie_word_embeddings"] = False
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    return out_dir
