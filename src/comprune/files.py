"""Checks on a model directory's files before anything loads them (docs/reliability.md):

- `read_config`: config.json parsed, or one line naming it;
- `check_safetensors`: every safetensors file complete (header readable, data as long as the header says);
- `check_gguf`: the same for a .gguf file;
- `refuse_pickles`: a directory whose weights are only pickles (.bin/.pt/.pth) needs --allow-pickle;
- `weights_digest_sample`: a cheap identity of weight files (headers + strided bytes) for resume fingerprints;
- `tensor_digest_sample`: the same for in-memory tensors.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import mmap
import os
import struct
from pathlib import Path

from .errors import CompruneError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_config(model_dir) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CompruneError(f"{model_dir} has no config.json: pass a model directory saved by comprune or "
                            "transformers")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CompruneError(f"{path} is not valid JSON ({str(e).splitlines()[0][:100]}): fix it or re-save the "
                            "model") from None
    except OSError as e:
        raise CompruneError(f"cannot read {path} ({e.strerror or e}): check the file") from None
    if not isinstance(cfg, dict):
        raise CompruneError(f"{path} is not a JSON object: fix it or re-save the model")
    return cfg


def safetensors_header(path) -> tuple[dict, int]:
    """(header, data start) of a safetensors file, or one line saying it is truncated or corrupt."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] or [0])
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        raise CompruneError(f"{path} is truncated or corrupt (not a readable safetensors file): re-download or "
                            "re-save the model") from None
    if 8 + n + end > size:
        raise CompruneError(f"{path} is truncated ({size} bytes, its header needs {8 + n + end}): re-download "
                            "or re-save the model")
    return header, 8 + n


def check_safetensors(model_dir) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    for f in files:
        safetensors_header(f)
    return files


# GGUF metadata value types (gguf.GGUFValueType): struct format of the scalars; 8 = string, 9 = array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def check_gguf(path) -> None:
    """One line when a .gguf file is not a GGUF, or shorter than its header says: transformers would fail only
    after dequantising the tensors before the cut (tens of seconds for SmolLM2), with a reshape error."""
    if importlib.util.find_spec("gguf") is None:
        return  # transformers cannot read GGUF without it either, and says so
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            need = _gguf_needs(buf)
    except (struct.error, ValueError, KeyError, OverflowError, MemoryError):  # ValueError: also an empty file
        need = None
    if need is None:
        raise CompruneError(f"{path} is truncated or not a GGUF file (its header does not parse): re-download or "
                            "re-export it")
    if need > size:
        raise CompruneError(f"{path} is truncated ({size} bytes, its header needs {need}): re-download or "
                            "re-export it")


def _gguf_needs(buf) -> int | None:
    """The file size a GGUF header implies (data start + the end of its last tensor), None if it is no GGUF."""
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string():
        nonlocal pos
        n = take("Q")
        if pos + n > len(buf):
            raise ValueError("string past the end")
        pos += n
        return bytes(buf[pos - n:pos])

    def value(kind):
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:
            elem, count = take("I"), take("Q")
            if elem in _GGUF_SCALARS:  # skip a scalar array at once (token scores: 49k floats)
                pos += count * struct.calcsize(_GGUF_SCALARS[elem])
                return None
            return [value(elem) for _ in range(count)] if count <= len(buf) else None
        return take(_GGUF_SCALARS[kind])  # KeyError: an unknown type

    if bytes(buf[:4]) != b"GGUF":
        return None
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    if version not in (2, 3) or n_tensors > len(buf) or n_kv > len(buf):
        return None
    align = 32
    for _ in range(n_kv):
        key, kind = string(), take("I")
        val = value(kind)
        if key == b"general.alignment":
            align = int(val)
    tensors = []
    for _ in range(n_tensors):
        string()
        dims = take(f"{take('I')}Q")
        dims = dims if isinstance(dims, tuple) else (dims,)
        tensors.append((dims, take("I"), take("Q")))
    start = -(-pos // align) * align
    return start + max((off + _gguf_bytes(dims, kind) for dims, kind, off in tensors), default=0)


def _gguf_bytes(dims, kind) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # the reader transformers needs for GGUF anyway
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    n = 1
    for d in dims:
        n *= int(d)
    return n // block * nbytes


def pickle_files(model_dir) -> list[Path]:
    return sorted(p for p in Path(model_dir).iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES
                  and not p.name.startswith("training_args"))


def refuse_pickles(model_dir, allow_pickle: bool) -> bool:
    """True when the directory's weights are pickles and the user allowed them; raises when not allowed."""
    if list(Path(model_dir).glob("*.safetensors")):
        return False
    pickles = pickle_files(model_dir)
    if not pickles:
        return False
    if not allow_pickle:
        raise CompruneError(f"{model_dir} holds its weights as pickles ({pickles[0].name}), which can run code when "
                            "loaded: convert them to safetensors, or pass --allow-pickle to load them with "
                            "torch's restricted unpickler")
    return True


def weights_digest_sample(files, chunks: int = 64, chunk_bytes: int = 1 << 16) -> str:
    """sha256 of each file's name, size, header and `chunks` evenly spaced pieces of its data: cheap (a few MB
    read whatever the model's size) and different for any two models one would confuse."""
    h = hashlib.sha256()
    for f in sorted(Path(p) for p in files):
        size = f.stat().st_size
        h.update(f"{f.name}|{size}|".encode())
        with open(f, "rb", buffering=0) as fh:
            step = max(chunk_bytes, size // chunks)
            for pos in range(0, size, step):
                h.update(os.pread(fh.fileno(), chunk_bytes, pos))
    return h.hexdigest()[:16]


def tensor_digest_sample(named_tensors, per_tensor: int = 4096) -> str:
    """sha256 of each tensor's name, shape and ~`per_tensor` evenly spaced values (meta tensors: shape only)."""
    import torch
    h = hashlib.sha256()
    for name, t in named_tensors:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.device.type == "meta" or not t.numel():
            continue
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // per_tensor)].to("cpu", torch.float64).contiguous()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def check_tensors_match(expected: dict, found: dict, where, optional=()) -> None:
    """Tensor names and shapes of the weights (`found`) against what the config builds (`expected`): a missing
    tensor would be left uninitialised, an unexpected one ignored, a wrong shape would fail later (or load in
    llama.cpp wrongly). Each is one line naming the tensor."""
    optional = set(optional)
    missing = sorted(set(expected) - set(found) - optional)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CompruneError(f"tensor {missing[0]}{more} is missing from the weights of {where}: the weights do not "
                            "match config.json; re-save the model or fix its config")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CompruneError(f"tensor {unexpected[0]}{more} in the weights of {where} is not expected by its "
                            "config.json: re-save the model or fix its config")
    for name in sorted(set(expected) & set(found)):
        if tuple(expected[name]) != tuple(found[name]):
            raise CompruneError(f"tensor {name} in {where} has shape {tuple(found[name])} but config.json needs "
                                f"{tuple(expected[name])}: re-save the model or fix its config")
