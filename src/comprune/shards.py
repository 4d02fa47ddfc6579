"""safetensors shards: read tensors (or single rows) without mmap, rename in place, write atomically.

Every read is a plain read into a freshly allocated, 64-byte aligned tensor (no mmap: a file's pages never
count in the process's RSS, and mmap-backed tensors are misaligned, which slows CPU matmuls several times).
Every write streams each tensor's bytes to a temporary file that is then renamed, so no serialized copy of the
tensors is ever held in memory and a crash never leaves a half-written file under the final name.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CompruneError
from .files import safetensors_header
from .outputs import json_text

INDEX = "model.safetensors.index.json"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class ShardIndex:
    """Tensor name -> shard file of a safetensors model directory (index.json, or the files' headers)."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX
        self.shapes = {}  # every tensor's shape, from the (checked) headers
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
                self.files = {k: self.dir / v for k, v in wm.items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                raise CompruneError(f"{index} is not a valid safetensors index: re-save the model") from None
            for f in sorted(set(self.files.values())):
                if not f.is_file():
                    raise CompruneError(f"{f} is listed in {INDEX} but missing: re-download or re-save the model")
                header, _ = safetensors_header(f)
                self.shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
        else:
            self.files = {}
            for f in sorted(self.dir.glob("*.safetensors")):
                header, _ = safetensors_header(f)
                for k, v in header.items():
                    if k != "__metadata__":
                        self.files[k] = f
                        self.shapes[k] = tuple(v["shape"])
        if not self.files:
            raise CompruneError(f"{self.dir} has no safetensors weights: --stream needs a model directory saved "
                                "as safetensors (transformers' save_pretrained writes them)")

    def __contains__(self, name):
        return name in self.files

    def read(self, names, dtype=None, device="cpu") -> dict[str, torch.Tensor]:
        """Read only `names`, one shard file at a time (each opened, read and closed: no lingering mmaps)."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise CompruneError(f"tensor {missing[0]} is not in the shards of {self.dir}: the checkpoint does not "
                                "match its config.json")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for f, keys in by_file.items():
            out.update(read_tensors(f, keys, dtype, device))
        return out


def read_tensors(path, keys=None, dtype=None, device="cpu") -> dict[str, torch.Tensor]:
    """Tensors `keys` (all when None) of one safetensors file, as owned tensors on `device`.

    Plain reads into freshly allocated (aligned) tensors: no mmap, so the file's pages never count in this
    process's RSS and a tensor costs its own size once (safetensors' mmap-backed tensors are also misaligned,
    which makes CPU matmuls several times slower, so they would need a copy anyway)."""
    device = torch.device(device)
    with open(path, "rb", buffering=0) as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for k in (header.keys() - {"__metadata__"} if keys is None else keys):
            info = header[k]
            if info["dtype"] not in _ST_NAMES:
                return _read_tensors_safe_open(path, keys, dtype, device)
            t = torch.empty(info["shape"], dtype=_ST_NAMES[info["dtype"]])
            start, end = info["data_offsets"]
            if end > start:
                buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                f.seek(base + start)
                done = 0
                while done < end - start:
                    got = f.readinto(buf[done:])
                    if not got:
                        raise CompruneError(f"{path} is truncated: re-download or re-save the model")
                    done += got
            out[k] = _own(t, dtype, device)
    return out


def _read_tensors_safe_open(path, keys, dtype, device):
    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as h:
        for k in (h.keys() if keys is None else keys):
            out[k] = _own(h.get_tensor(k), dtype, device)
    return out


def _own(t: torch.Tensor, dtype, device: torch.device) -> torch.Tensor:
    """Cast and move; on the CPU also make sure the storage is 64-byte aligned (misaligned weights make
    matmuls several times slower)."""
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    if device.type != "cpu":
        return t.to(device)
    if t.data_ptr() % 64:
        t = torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)
    return t


def read_header(path) -> dict:
    return read_header_and_base(path)[0]


def read_header_and_base(path) -> tuple[dict, int]:
    """The header of a safetensors file and the file offset where its tensor data starts."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def read_rows(path, name: str, rows: list[int], dtype=None) -> torch.Tensor:
    """Rows `rows` of the 2-D tensor `name` in a safetensors file, read one by one (no mmap, no full table)."""
    header, data = read_header_and_base(path)
    info = header[name]
    src_dtype = _ST_NAMES[info["dtype"]]
    width = info["shape"][1]
    out = torch.empty(len(rows), width, dtype=src_dtype)
    row_bytes = width * out.element_size()
    base = data + info["data_offsets"][0]
    with open(path, "rb", buffering=0) as f:
        buf = memoryview(out.view(torch.uint8).numpy()).cast("B")
        for k, r in enumerate(rows):
            got = os.pread(f.fileno(), row_bytes, base + r * row_bytes)
            if len(got) != row_bytes:
                raise CompruneError(f"{path} is truncated: re-download or re-save the model")
            buf[k * row_bytes:(k + 1) * row_bytes] = got
    return out if dtype is None or out.dtype == dtype else out.to(dtype)


def rename_tensors(src: Path, dst: Path, rename) -> dict:
    """Move a safetensors file to `dst` with its tensors renamed by `rename(name)`. The header is rewritten in
    place (padded with spaces, as the format allows) when the new one is not longer; otherwise the data bytes
    are copied behind a new header. Never loads a tensor. Returns the new header."""
    with open(src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    new = {k if k == "__metadata__" else rename(k): v for k, v in header.items()}
    blob = json_text(new, separators=(",", ":")).encode()
    if len(blob) <= n:
        with open(src, "r+b") as f:
            f.seek(8)
            f.write(blob + b" " * (n - len(blob)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(src, dst)
    else:
        blob += b" " * (-len(blob) % 8)
        tmp = dst.with_name(f".{dst.name}.tmp")
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            fi.seek(8 + n)
            fo.write(struct.pack("<Q", len(blob)) + blob)
            shutil.copyfileobj(fi, fo, 16 << 20)
        os.replace(tmp, dst)
        src.unlink()
    return new


def save_tensors(tensors: dict, path: Path):
    """Atomic safetensors write (temporary name, then rename), streaming each tensor's bytes to the file:
    unlike safetensors.torch.save_file it never holds a serialized copy of the tensors in memory."""
    items = sorted(tensors.items())
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k, v in items:
        n = v.nbytes() if hasattr(v, "write_to") else v.numel() * v.element_size()
        header[k] = {"dtype": _ST_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json_text(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, v in items:
            if hasattr(v, "write_to"):  # SourceTensor, a checkpoint's activation batch: written piece by piece
                v.write_to(f)
                continue
            t = v.detach().to("cpu").contiguous().reshape(-1)
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).numpy()))
    os.replace(tmp, path)


class SourceTensor:
    """A tensor of a source shard, copied into an output file in bounded chunks (cast on the way if needed)."""

    def __init__(self, path: Path, name: str, dtype=None):
        header, self.data = read_header_and_base(path)
        info = header[name]
        self.path, self.name, self.info = path, name, info
        self.src_dtype = _ST_NAMES[info["dtype"]]
        self.dtype = dtype if dtype is not None and self.src_dtype.is_floating_point else self.src_dtype
        self.shape = list(info["shape"])

    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def write_to(self, f, chunk_bytes: int = 16 << 20):
        src_size = torch.empty((), dtype=self.src_dtype).element_size()
        chunk = max(1, chunk_bytes // src_size) * src_size
        base = self.data
        with open(self.path, "rb", buffering=0) as fi:
            start, end = self.info["data_offsets"]
            for pos in range(base + start, base + end, chunk):
                data = os.pread(fi.fileno(), min(chunk, base + end - pos), pos)
                if self.dtype != self.src_dtype:
                    data = torch.frombuffer(bytearray(data), dtype=self.src_dtype).to(self.dtype).view(
                        torch.uint8).numpy().tobytes()
                f.write(data)
