"""Export a (pruned) Hugging Face model directory to a GGUF file that llama.cpp runs.

Follows llama.cpp's convert_hf_to_gguf.py for tensor names, the Q/K permutation, tokenizer metadata and
rope/norm keys; what differs per family (Gemma, Qwen3, Phi-3, OLMo 2, Granite, SmolLM3) is in gguf_arch.py.

Uniform MLP widths -> llama.cpp's own arch for the family (`llama` for Llama and Mistral). Per-layer widths ->
`deci` (llama.cpp's DeciLM / Nemotron-NAS arch), which reads `feed_forward_length` and the head counts as
per-layer arrays; it exists for the Llama layout only, so other families export uniform widths only.

MLP widths in the file can be larger than the model's, padded with zero neurons (zero gate/up rows, zero
down columns: silu(0) * 0 = 0, so the output is unchanged):
- llama.cpp's deci graph drops the whole layer (attention output included) when a layer's width is 0,
  so a removed MLP is written as a width-1 MLP of zeros and the attention half of the layer is kept;
- every width is rounded up to a multiple of PAD_TO (32) by default: llama.cpp's f16 kernels run an odd width
  much slower than the next multiple of 32 (SmolLM2 on an AVX2 CPU: MLPs at 1017 prompt 0.95x / generate
  1.11x the dense model, at 1024 1.22x / 1.21x; benchmarks/results/round_to_amd.md), far more than the
  zero neurons cost; `pad_to=1` writes the exact widths;
- q8_0 quantizes rows in blocks of 32, so for q8_0 widths are always a multiple of 32 and ffn_down (whose rows
  are as long as the width) is quantized too instead of staying f16.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from ..errors import CompruneError, require
from ..files import check_safetensors, check_tensors_match, read_config
from ..outputs import check_output, guard_output, sibling
from .gguf_arch import (add_family_hparams, check_family_config, expert_count, expert_names, expert_width,
                        gguf_family, pick_arch, rope_dims, spec_for, transform)

log = logging.getLogger(__name__)

# qtype -> (tensor type for 2-D weights, GGUF file type)
QTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def export_gguf(model_dir, out_path, qtype: str = "f16", force: bool = False, pad_to: int | None = None) -> dict:
    """Write `model_dir` (a dense or pruned HF dir) as a GGUF file; returns a summary dict. An existing file is
    replaced only with `force`; every tensor's shape is checked against the config before anything is written.
    MLP widths are written padded to a multiple of `pad_to` (default PAD_TO; see the module docstring)."""
    start = time.time()
    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg, arch, tensors, widths, file_widths = prepare(model_dir, qtype, pad_to)
    check_output(out_path, force, kind="file", flag="--gguf")
    with guard_output(out_path):
        tmp = sibling(out_path, f"tmp{os.getpid()}")
        _write(model_dir, tmp, cfg, arch, tensors, file_widths, qtype)
        os.replace(tmp, out_path)  # readers never see a half-written file
    return {"path": str(out_path), "bytes": out_path.stat().st_size, "arch": arch, "qtype": qtype,
            "n_layers": len(widths), "ffn_widths": widths, "gguf_ffn_widths": file_widths,
            "seconds": round(time.time() - start, 2)}


def prepare(model_dir: Path, qtype: str, pad_to: int | None = None):
    """(config, llama.cpp arch, lazy tensors, MLP widths, widths as written) of a model directory, every shape
    checked against its config."""
    require(model_dir.is_dir(), f"model directory {model_dir} not found")
    require(qtype in QTYPES, f"unknown GGUF type '{qtype}': use one of {', '.join(QTYPES)}")
    require(pad_to is None or (isinstance(pad_to, int) and pad_to >= 1),
            f"--pad-to must be a positive number of neurons (1: exact widths), not {pad_to}")
    cfg = read_config(model_dir)
    family = model_family(cfg)
    check_safetensors(model_dir)
    tensors = open_safetensors(model_dir)
    try:
        widths = ffn_widths(cfg, tensors)
        check_shapes(cfg, tensors, widths, model_dir)
    except (KeyError, TypeError, ValueError) as e:
        raise CompruneError(f"{model_dir}/config.json lacks or mis-states {e} for GGUF export: re-save the model") \
            from None
    arch = pick_arch(family, widths, layer_heads(cfg))
    check_family_config(family, cfg)
    return cfg, arch, tensors, widths, [padded_width(w, qtype, pad_to) for w in widths]


def new_writer(model_dir: Path, path: Path, cfg: dict, arch: str, file_widths: list[int], qtype: str):
    """A GGUF writer holding every key/value of the export (hyperparameters and tokenizer), no tensors yet."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(model_dir.name)
    add_hparams(writer, cfg, arch, file_widths, qtype)
    add_family_hparams(writer, model_family(cfg), cfg)
    add_tokenizer(writer, model_dir, int(cfg["vocab_size"]))
    return writer


def _write(model_dir, tmp, cfg, arch, tensors, file_widths, qtype):
    writer = None
    try:
        writer = new_writer(model_dir, tmp, cfg, arch, file_widths, qtype)
        for name, data in gguf_tensors(tensors, cfg, arch, file_widths):
            _add_tensor(writer, name, data, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- config

def model_family(cfg: dict) -> str:
    family = str(cfg.get("model_type", "")).removeprefix("comprune_")
    spec_for(family)  # refuses families llama.cpp cannot run
    return family


def ffn_widths(cfg: dict, tensors: dict) -> list[int]:
    """Per-layer MLP widths: `intermediate_sizes` (pruned, non-uniform) or the one `intermediate_size`."""
    n_layers = int(cfg["num_hidden_layers"])
    family = model_family(cfg)
    if gguf_family(family).moe:
        return _expert_widths(family, cfg, tensors, n_layers)
    widths = [int(w) for w in cfg.get("intermediate_sizes") or [cfg["intermediate_size"]] * n_layers]
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


def pad_step(qtype: str, pad_to: int | None = None) -> int:
    """The multiple every written MLP width is rounded up to (q8_0's blocks of 32 always)."""
    return math.lcm(PAD_TO if pad_to is None else pad_to, 32 if qtype == "q8_0" else 1)


def padded_width(width: int, qtype: str, pad_to: int | None = None) -> int:
    """MLP width written to the file (zero neurons added, see module docstring). A removed MLP is one zero
    neuron (a whole block of 32 for q8_0), not a padded block: it has no product worth a fast kernel."""
    if width == 0:
        return 32 if qtype == "q8_0" else 1
    step = pad_step(qtype, pad_to)
    return -(-width // step) * step


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


def _rope(cfg: dict) -> dict:
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
    rope = _rope(cfg)
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


# ---------------------------------------------------------------- tensors

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
    rope, dim = _rope(cfg), head_dim(cfg)
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
    if _rope(cfg)["rope_type"] == "llama3":
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
                    data = torch.cat([_pad_mlp(h, "mlp.up_proj", kind, width) for h in data.chunk(2)])
                elif hf.startswith("mlp."):
                    data = _pad_mlp(data, hf, kind, width)
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
            [_pad_mlp(tensors[p + f"{hf.format(e=e)}.weight"].load(), kind, "weight", width) for e in range(n_exp)])


def _pad_mlp(data: torch.Tensor, hf: str, kind: str, width: int) -> torch.Tensor:
    """Add zero neurons up to `width`: rows of gate/up (and their biases), columns of down."""
    if hf == "mlp.down_proj":
        return data if kind == "bias" else torch.nn.functional.pad(data, (0, width - data.shape[1]))
    pad = (0, width - data.shape[0]) if kind == "bias" else (0, 0, 0, width - data.shape[0])
    return torch.nn.functional.pad(data, pad)


def tensor_type(shape, qtype: str):
    """Norms, biases and rope factors stay f32 (as in llama.cpp's converter); 2-D weights take `qtype`."""
    target = QTYPES[qtype][0] if len(shape) == 2 else gguf.GGMLQuantizationType.F32
    if target == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[target][0] != 0:
        target = gguf.GGMLQuantizationType.F16  # q8_0 blocks are 32 wide along a row (e.g. odd head sizes)
    return target


def _add_tensor(writer, name: str, data: torch.Tensor, qtype: str) -> None:
    arr = data.contiguous().numpy().astype(np.float32)
    target = tensor_type(arr.shape, qtype)
    if target == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, arr)
    elif target == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, arr.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(arr, target), raw_dtype=target)


# ---------------------------------------------------------------- tokenizer

# tokenizer.json pre-tokenizer regex -> llama.cpp `tokenizer.ggml.pre` name (plain byte-level handled below)
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_BY_REGEX = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


def bpe_pre_name(tok: dict) -> str:
    """Which llama.cpp pre-tokenizer reproduces tokenizer.json's pre-tokenizer.

    The official converter hashes the tokenization of a probe text; reading the pre-tokenizer spec covers
    the families comprune handles without a table of hashes.
    """
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    for step in steps:
        regex = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        if regex in PRE_BY_REGEX:
            return PRE_BY_REGEX[regex]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # SmolLM / StarCoder: each digit alone, then the GPT-2 regex
    log.warning("unrecognised pre-tokenizer %s: writing 'default', llama.cpp may split text differently", kinds)
    return "default"


def add_tokenizer(writer, model_dir: Path, n_vocab: int) -> None:
    """tokenizer.json BPE -> llama.cpp `gpt2` (byte-level) or `llama` (SentencePiece-style, byte fallback)."""
    path = model_dir / "tokenizer.json"
    require(path.is_file(), f"{model_dir} has no tokenizer.json: GGUF export needs a fast (tokenizers) tokenizer")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok["model"]
    require(model.get("type") == "BPE", f"GGUF export supports BPE tokenizers, not {model.get('type')}")
    spm = bool(model.get("byte_fallback"))
    id_to_text = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    id_to_text.update({i: a["content"] for i, a in added.items()})
    require(max(id_to_text) < n_vocab, f"tokenizer has ids up to {max(id_to_text)} but the model's vocab_size "
                                       f"is {n_vocab}")
    tokens, types, scores = [], [], []
    TT = gguf.TokenType
    for i in range(n_vocab):
        text = id_to_text.get(i)
        if text is None:  # embedding rows beyond the tokenizer (vocab padded for speed)
            text, kind = f"[PAD{i}]", TT.UNUSED
        elif spm and text == model.get("unk_token"):
            kind = TT.UNKNOWN
        elif spm and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = TT.BYTE  # byte-fallback pieces
        elif i in added:
            kind = TT.CONTROL if added[i].get("special") else TT.USER_DEFINED
        else:
            kind = TT.NORMAL
        tokens.append(text)
        types.append(kind)
        # SentencePiece merges the pair whose result scores highest: BPE ids follow merge order
        scores.append(-float(i) if kind == TT.NORMAL else 0.0)
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    if spm:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        norm = json.dumps(tok.get("normalizer")) + json.dumps(tok.get("pre_tokenizer"))
        writer.add_add_space_prefix("Prepend" in norm or '"prepend_scheme": "always"' in norm)
    else:
        writer.add_tokenizer_pre(bpe_pre_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=not spm, n_vocab=n_vocab)
    if "bos" not in special.add_special_token and not spm:
        special.add_special_token["bos"] = False  # HF adds no BOS unless its config says so
    special.add_to_gguf(writer, quiet=True)
