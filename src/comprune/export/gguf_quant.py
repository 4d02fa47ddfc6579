"""The quantized GGUF types users deploy (q4_0 ... q8_0 and the K-quant mixes q2_k ... q6_k): which type each
tensor gets, and the bytes of each, written by llama.cpp's own quantizer kernel.

The kernel is `ggml_quantize_chunk` of the llama.cpp build that xllamacpp ships (the `[llamacpp]` extra), called
through ctypes: the same code `llama-quantize` runs, importance matrix included. What `llama-quantize` adds on
top, the *mix* (which tensor of a Q4_K_M file is Q4_K, Q6_K, Q5_0 or Q8_0), is llama.cpp's C++ policy
`llama_tensor_get_type` (src/llama-quant.cpp), which the bindings do not export: `tensor_type` restates its rules
for the types offered here and the (non-Falcon) models comprune exports:

- the output matrix (or the token embedding when it doubles as the output) becomes Q6_K, or Q8_0 when its rows
  are no multiple of the type's block (a q8_0 file keeps Q8_0);
- attn_v: Q4_K (q2_k with n_head/n_kv >= 4) or Q3_K (q2_k otherwise), Q5_K in the first two layers and Q4_K
  after (q3_k_m), Q6_K in the `use_more_bits` layers (q4_k_m, q5_k_m);
- ffn_down: Q3_K (q2_k); Q5_K in the first 1/16 of the layers, else Q4_K (q3_k_m; llama.cpp's Falcon-only Q3_K
  branch never applies); Q6_K in the `use_more_bits` layers (q4_k_m, q5_k_m); with an importance matrix, the
  first 1/8 of the layers of q4_0/q5_0 become q4_1/q5_1;
- attn_output: Q3_K (q2_k), Q4_K (q3_k_m); fused attn_qkv: Q4_K (q3_k_m), Q5_K (q4_k_m), Q6_K (q5_k_m);
- a model of exactly 8 experts (Mixtral): attn_v and attn_k Q8_0, attn_output Q5_K (q2_k, q3_k_m, q4_k_m);
- a row length that is no multiple of the chosen type's block falls back (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0), then to F16 if still no multiple of 32. SmolLM2's hidden size 576 is no
  multiple of 256: most of its K-quant tensors are these fallbacks, exactly as in llama.cpp's own files.
  Where llama.cpp has no fallback (a 32-block type on a row of odd length) it refuses; the export writes F16.
Norms, biases, rope factors and the MoE router stay F32, as in llama.cpp.
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .. import deferred
from ..errors import CompruneError, require

T = gguf.GGMLQuantizationType
F = gguf.LlamaFileType

# qtype -> (the type most 2-D weights take, GGUF file type)
QUANT_TYPES = {
    "q4_0": (T.Q4_0, F.MOSTLY_Q4_0), "q4_1": (T.Q4_1, F.MOSTLY_Q4_1),
    "q5_0": (T.Q5_0, F.MOSTLY_Q5_0), "q5_1": (T.Q5_1, F.MOSTLY_Q5_1),
    "q2_k": (T.Q2_K, F.MOSTLY_Q2_K), "q3_k_m": (T.Q3_K, F.MOSTLY_Q3_K_M), "q4_k_m": (T.Q4_K, F.MOSTLY_Q4_K_M),
    "q5_k_m": (T.Q5_K, F.MOSTLY_Q5_K_M), "q6_k": (T.Q6_K, F.MOSTLY_Q6_K),
}
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


@dataclass(frozen=True)
class Mix:
    """What the per-tensor choice of a quantized type depends on besides the tensor itself."""
    qtype: str
    n_layers: int
    n_gqa: int          # query heads per KV head of the first layer (llama.cpp's hparams.n_gqa())
    tied: bool          # no output.weight in the file: token_embd is also the output matrix
    imatrix: bool = False
    n_expert: int = 0


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _block(kind) -> int:
    return gguf.GGML_QUANT_SIZES[kind][0]


def _fallback(kind, ncols: int):
    if ncols % _block(kind) == 0:
        return kind
    kind = FALLBACK.get(kind, T.F16)
    return kind if ncols % _block(kind) == 0 else T.F16


def quantizable(name: str, shape) -> bool:
    """llama.cpp quantizes 2-D and 3-D weights but norms and the MoE router (`ffn_gate_inp`)."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name \
        and "ffn_gate_inp.weight" not in name


def tensor_type(name: str, shape, mix: Mix):
    """The GGML type llama-quantize gives tensor `name` (GGUF name, torch shape) in a `mix.qtype` file."""
    if not quantizable(name, shape):
        return T.F32
    base, ncols, q = QUANT_TYPES[mix.qtype][0], int(shape[-1]), mix.qtype
    m = re.match(r"blk\.(\d+)\.", name)
    layer = int(m.group(1)) if m else 0
    kind = base
    if name == "output.weight" or (mix.tied and name == "token_embd.weight"):
        kind = T.Q8_0 if ncols % _block(base) else T.Q6_K
    elif name.endswith("attn_v.weight"):
        if q == "q2_k":
            kind = T.Q4_K if mix.n_gqa >= 4 else T.Q3_K
        elif q == "q3_k_m":
            kind = T.Q5_K if layer < 2 else T.Q4_K
        elif q in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, mix.n_layers):
            kind = T.Q6_K
        if mix.n_expert == 8:
            kind = T.Q8_0
    elif name.endswith("attn_k.weight") and mix.n_expert == 8:
        kind = T.Q8_0
    elif "ffn_down" in name:
        n = mix.n_layers
        if q == "q2_k":
            kind = T.Q3_K
        elif q == "q3_k_m":
            kind = T.Q5_K if layer < n // 16 else T.Q4_K
        elif q in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n):
            kind = T.Q6_K
        elif q in ("q4_0", "q5_0") and mix.imatrix and layer < n // 8:
            kind = T.Q4_1 if q == "q4_0" else T.Q5_1
    elif name.endswith("attn_output.weight"):
        if mix.n_expert == 8:
            kind = T.Q5_K if q in ("q2_k", "q3_k_m", "q4_k_m") else base
        else:
            kind = {"q2_k": T.Q3_K, "q3_k_m": T.Q4_K}.get(q, base)
    elif name.endswith("attn_qkv.weight"):
        kind = {"q3_k_m": T.Q4_K, "q4_k_m": T.Q5_K, "q5_k_m": T.Q6_K}.get(q, base)
    return _fallback(kind, ncols)


def tensor_bytes(shape, kind) -> int:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return int(np.prod(shape)) // block * size


_LIB = None


def _ggml():
    """xllamacpp's shared library, with the C signatures of the ggml functions used here."""
    global _LIB
    if _LIB is None:
        try:
            module = deferred.xllamacpp()
        except ImportError:
            raise CompruneError("quantized GGUF types need llama.cpp's quantizer: pip install 'comprune[llamacpp]' "
                                "(xllamacpp), or export f16 / q8_0") from None
        path = next(Path(module.__file__).parent.glob("xllamacpp*.so"), None)
        require(path is not None, f"xllamacpp at {Path(module.__file__).parent} has no shared library: reinstall it")
        lib = ctypes.CDLL(str(path))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        _LIB = lib
    return _LIB


def quantize(data: np.ndarray, kind, imatrix: np.ndarray | None = None) -> np.ndarray:
    """`data` (float32, rows along the last axis) as `kind` by llama.cpp's kernel: uint8 of shape
    (..., bytes per row), what gguf's writer takes with raw_dtype=kind. `imatrix`: one weight per column (the
    mean squared input), which the low-bit kernels use to spend their error where the inputs are small."""
    lib = _ggml()
    data = np.ascontiguousarray(data, dtype=np.float32)
    ncols = data.shape[-1]
    nrows = data.size // ncols
    row = lib.ggml_row_size(int(kind), ncols)
    require(row == ncols // _block(kind) * gguf.GGML_QUANT_SIZES[kind][1], f"ggml disagrees on {kind.name}'s size")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        require(imatrix.shape == (ncols,), f"importance matrix of {imatrix.shape} for rows of {ncols}")
    require(imatrix is not None or not lib.ggml_quantize_requires_imatrix(int(kind)),
            f"{kind.name} needs an importance matrix")
    out = np.empty((nrows, row), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(kind), data.ctypes.data, out.ctypes.data, 0, nrows, ncols,
                                      None if imatrix is None else imatrix.ctypes.data)
    require(written == out.size, f"llama.cpp wrote {written} bytes of {kind.name}, not {out.size}")
    return out.reshape(*data.shape[:-1], row)
