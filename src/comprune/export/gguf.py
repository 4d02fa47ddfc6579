"""Export a (pruned) Hugging Face model directory to a GGUF file that llama.cpp runs.

Follows llama.cpp's convert_hf_to_gguf.py for tensor names, the Q/K permutation, tokenizer metadata and
rope/norm keys; what differs per family (Gemma, Qwen3, Phi-3, OLMo 2, Granite, SmolLM3) is its record's
GGUFLayout (models/families.py) and gguf_arch.py.

Uniform MLP widths -> llama.cpp's own arch for the family (`llama` for Llama and Mistral). Per-layer widths ->
`deci` (llama.cpp's DeciLM / Nemotron-NAS arch), which reads `feed_forward_length` and the head counts as
per-layer arrays; it exists for the Llama layout only, so other families export uniform widths only.

Each concern has its module: gguf_hparams (keys), gguf_widths (MLP widths and their zero padding),
gguf_tensors (tensor names, order and checks), gguf_tokenizer (vocabulary); this one writes the file.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import CompruneError, require
from ..files import check_safetensors, read_config
from ..outputs import check_output, guard_output, sibling
from .gguf_arch import add_family_hparams, check_family_config, expert_count, gguf_family, pick_arch
from .gguf_hparams import QTYPES, add_hparams, layer_heads, model_family
from .gguf_quant import QUANT_TYPES, Mix, quantize
from .gguf_quant import tensor_type as mix_type
from .gguf_tensors import check_shapes, gguf_tensors, has_output, open_safetensors
from .gguf_tokenizer import add_tokenizer
from .gguf_widths import PAD_TO, ffn_widths, pad_step, padded_width

__all__ = ["PAD_TO", "QTYPES", "export_gguf", "gguf_tensors", "mix_of", "new_writer", "open_safetensors",
           "pad_step", "padded_width", "prepare", "tensor_type"]


def export_gguf(model_dir, out_path, qtype: str = "f16", force: bool = False, pad_to: int | None = None,
                imatrix: dict | None = None) -> dict:
    """Write `model_dir` (a dense or pruned HF dir) as a GGUF file; returns a summary dict. An existing file is
    replaced only with `force`; every tensor's shape is checked against the config before anything is written.
    MLP widths are written padded to a multiple of `pad_to` (default PAD_TO; see gguf_widths). `imatrix`
    (GGUF tensor name -> one importance per input column, export.imatrix) guides the quantized types but q8_0."""
    start = time.time()
    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg, arch, tensors, widths, file_widths = prepare(model_dir, qtype, pad_to)
    require(imatrix is None or qtype in QUANT_TYPES, f"an importance matrix guides the low-bit types "
                                                     f"({', '.join(QUANT_TYPES)}), not {qtype}: drop --imatrix")
    mix = mix_of(cfg, tensors, qtype, imatrix is not None)
    check_output(out_path, force, kind="file", flag="--gguf")
    with guard_output(out_path):
        tmp = sibling(out_path, f"tmp{os.getpid()}")
        # created here, exclusively and not through a link: the writer then opens this very file by name
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))  # umask applies
        types = _write(model_dir, tmp, cfg, arch, tensors, file_widths, qtype, mix, imatrix or {})
        os.replace(tmp, out_path)  # readers never see a half-written file
    return {"path": str(out_path), "bytes": out_path.stat().st_size, "arch": arch, "qtype": qtype,
            "imatrix": imatrix is not None, "n_layers": len(widths), "ffn_widths": widths,
            "gguf_ffn_widths": file_widths, "tensor_types": types, "seconds": round(time.time() - start, 2)}


def mix_of(cfg: dict, tensors: dict, qtype: str, imatrix: bool = False) -> Mix | None:
    """What a quantized type's per-tensor choice depends on (None for f32, f16 and q8_0, one type for all)."""
    if qtype not in QUANT_TYPES:
        return None
    n_head, n_kv = layer_heads(cfg)[0]
    family = model_family(cfg)
    experts = expert_count(family, cfg) if gguf_family(family).moe else 0
    return Mix(qtype, int(cfg["num_hidden_layers"]), n_head // max(n_kv, 1), not has_output(tensors, cfg), imatrix,
               experts)


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


def _write(model_dir, tmp, cfg, arch, tensors, file_widths, qtype, mix, imatrix) -> dict:
    """Write the file; returns how many tensors of each GGML type it holds."""
    writer, types = None, {}
    try:
        writer = new_writer(model_dir, tmp, cfg, arch, file_widths, qtype)
        for name, data in gguf_tensors(tensors, cfg, arch, file_widths):
            kind = _add_tensor(writer, name, data, qtype, mix, imatrix.get(name))
            types[kind.name] = types.get(kind.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return types
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise


def tensor_type(name: str, shape, qtype: str, mix: Mix | None = None):
    """The GGML type of tensor `name`: by llama.cpp's mix for the quantized types (gguf_quant); else norms,
    biases and rope factors stay f32 (as in llama.cpp's converter) and 2-D weights take `qtype`."""
    if mix is not None:
        return mix_type(name, shape, mix)
    target = QTYPES[qtype][0] if len(shape) == 2 else gguf.GGMLQuantizationType.F32
    if target == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[target][0] != 0:
        target = gguf.GGMLQuantizationType.F16  # q8_0 blocks are 32 wide along a row (e.g. odd head sizes)
    return target


def _add_tensor(writer, name: str, data: torch.Tensor, qtype: str, mix: Mix | None, imatrix) -> object:
    arr = data.contiguous().numpy().astype(np.float32)
    target = tensor_type(name, arr.shape, qtype, mix)
    if target == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, arr)
    elif target == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, arr.astype(np.float16))
    elif mix is None:
        writer.add_tensor(name, gguf.quants.quantize(arr, target), raw_dtype=target)
    else:  # llama.cpp's own kernel; experts (3-D) without an importance matrix
        writer.add_tensor(name, quantize(arr, target, imatrix if arr.ndim == 2 else None), raw_dtype=target)
    return target
