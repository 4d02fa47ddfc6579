"""A budget in bytes: what `comprune export` would write for a model directory, computed without writing its
tensors (comprune.budget.targets turns `comprune prune --target-size 80MB` into a ratio with it).

The size is exact: the same key/value data, tensor list, tensor types and alignment as the export, with each
tensor's byte count taken from its type instead of from quantised data. Pruning removes rows and columns of
2-D weights (and, with a whole layer, its norms), so the bytes a ratio saves are its parameters times the
bytes of one 2-D weight at that type; the ratio is then checked on the pruned directory itself.
"""
from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import gguf
import numpy as np

from ..errors import CompruneError
from .gguf import QTYPES, gguf_tensors, mix_of, new_writer, open_safetensors, prepare, tensor_type
from .gguf_quant import QUANT_TYPES

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """Bytes from '80MB', '80 MiB', '0.1GB' or '123456' (MB = 10^6 bytes, MiB = 2^20)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b|b)?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise CompruneError(f"'{text}' is not a file size: use e.g. 80MB, 75MiB or 0.1GB")
    return int(float(m.group(1)) * UNITS[m.group(2) or ""])


def weight_bytes(qtype: str, model_dir=None) -> float:
    """Bytes per element of a 2-D weight at `qtype` (f16: 2, q8_0: 34 per 32). A mix (q4_k_m ...) gives its
    tensors different types: with `model_dir`, the mean over the dense model's MLP weights as the mix writes
    them (a prune removes mostly MLP neurons)."""
    if model_dir is None or qtype not in QUANT_TYPES:
        block, size = gguf.GGML_QUANT_SIZES[QTYPES[qtype][0]]
        return size / block
    model_dir = Path(model_dir)
    cfg, arch, tensors, _, file_widths = prepare(model_dir, qtype)
    mix = mix_of(cfg, tensors, qtype)
    nbytes = numel = 0
    for name, t in gguf_tensors(tensors, cfg, arch, file_widths):
        if ".ffn_" in name and name.endswith(".weight") and "ffn_gate_inp" not in name and len(t.shape) >= 2:
            block, size = gguf.GGML_QUANT_SIZES[pruned_type(name, tuple(t.shape), qtype, mix)]
            nbytes, numel = nbytes + t.numel() // block * size, numel + t.numel()
    return nbytes / numel


def pruned_type(name: str, shape, qtype: str, mix) -> object:
    """The type tensor `name` takes once pruned: as now, but an ffn_down (whose rows are as long as the MLP) at a
    width in blocks of 32 only, i.e. at the mix's fallback type where its rows now fill K-quant blocks of 256."""
    if mix is not None and "ffn_down" in name:
        shape = (*shape[:-1], 32)
    return tensor_type(name, shape, qtype, mix)


def gguf_bytes(model_dir, qtype: str = "f16", pad_to: int | None = None, imatrix: bool = False,
               as_pruned: bool = False) -> int:
    """The exact size of `comprune export model_dir --type qtype`, without writing a tensor (`imatrix`: with an
    importance matrix, which changes q4_0's and q5_0's mix). `as_pruned`: with every ffn_down at the type a
    pruned width takes (pruned_type), the size a ratio's savings are counted from."""
    model_dir = Path(model_dir)
    cfg, arch, tensors, _, file_widths = prepare(model_dir, qtype, pad_to)
    mix = mix_of(cfg, tensors, qtype, imatrix)
    with tempfile.TemporaryDirectory() as d:
        writer = new_writer(model_dir, Path(d) / "meta.gguf", cfg, arch, file_widths, qtype)
        align, data = writer.data_alignment, 0
        try:
            for name, t in gguf_tensors(tensors, cfg, arch, file_widths):
                kind = (pruned_type if as_pruned else tensor_type)(name, tuple(t.shape), qtype, mix)
                block, size = gguf.GGML_QUANT_SIZES[kind]
                nbytes = t.numel() // block * size
                writer.add_tensor_info(name, tuple(t.shape), np.float32, nbytes, raw_dtype=kind)
                data += gguf.GGUFWriter.ggml_pad(nbytes, align)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            head = writer.fout[0].tell()
        finally:
            writer.close()
    return gguf.GGUFWriter.ggml_pad(head, align) + data


def param_counts(model_dir: Path) -> tuple[int, int]:
    """(all parameters, the decoder blocks') from the safetensors headers (a tied head is stored once)."""
    tensors = open_safetensors(model_dir)
    shapes = {name: math.prod(t.shape) for name, t in tensors.items()}
    return sum(shapes.values()), sum(n for k, n in shapes.items() if ".layers." in k)
