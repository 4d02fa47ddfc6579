"""Streaming prune: prune a model stored as safetensors shards without ever holding it whole.

The model is built as a skeleton on the meta device from its config.json: comprune's plain-PyTorch modules
for the Llama family (models/lite.py: same names and arithmetic, without transformers' ~130 MB modeling
imports), transformers' classes otherwise (accelerate's `init_empty_weights`); buffers such as rotary
`inv_freq` are real, on the CPU. The final norm is read from the shards; the input embedding stays on disk
(only the calibration tokens' rows are read) and so does the LM head (read only while a method needs it).
Every decoder block gets a `BlockStream` as its `_comprune_stream` attribute, and `walk.resident` - the
context manager every forward-only method uses to enter a block - calls `materialize` on enter (read only
that block's tensors, on the compute device) and `release` on exit (back to meta tensors of the block's
current shapes). A block that the method changed while resident is written to the partial output as
`block-NNNNN.safetensors` before it is released; the next time it is entered it is read from there.

So the usual `prune()` runs unchanged on the skeleton: its budget, layer stage, neuron stage, checkpoints,
block dropping and config rewrite only read shapes. Afterwards the kept blocks are renumbered
(`model.layers.{new_idx}.*`: the staged file's header is rewritten in place, the tensor data is not copied;
blocks the method never changed are copied from the source shards one at a time), the non-block tensors,
`model.safetensors.index.json`, config (+ modeling file when MLP widths differ), generation config,
tokenizer and `pruning.json` are written, and the partial directory is renamed to the output: a killed run
never leaves a directory that looks complete. With `resume=True` an interrupted run continues from its
checkpoint; blocks finished before the kill are re-read from the partial output.

Peak memory: the runtime + one block (+ its pruned copy and the scores' f x f Gram matrices) + one batch
of activations (the rest are spilled to files), instead of the whole model.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CompruneError

INDEX = "model.safetensors.index.json"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
STREAM_ATTR = "_comprune_stream"
STAGED = "block-{:05d}.safetensors"
# Methods whose surgery touches blocks outside walk.resident (a run function's `streams = True` overrides).
NOT_STREAMING = {"magnitude", "flap"}


def can_stream(method_name: str) -> bool:
    """Whether `comprune prune --stream` accepts this method (forward-only and block-local)."""
    from .methods import METHODS
    run = METHODS.get(method_name)
    return run is not None and not getattr(run, "needs_gradients", False) and \
        getattr(run, "streams", method_name not in NOT_STREAMING)


# ------------------------------------------------------------------------------------------- shard access
class ShardIndex:
    """Tensor name -> shard file of a safetensors model directory (index.json, or the files' headers)."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        from .files import safetensors_header
        index = self.dir / INDEX
        self.shapes = {}
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
    from safetensors import safe_open
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
    blob = json.dumps(new, separators=(",", ":")).encode()
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




def _save(tensors: dict, path: Path):
    """Atomic safetensors write (temporary name, then rename), streaming each tensor's bytes to the file:
    unlike safetensors.torch.save_file it never holds a serialized copy of the tensors in memory."""
    items = sorted(tensors.items())
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k, v in items:
        n = v.nbytes() if hasattr(v, "write_to") else v.numel() * v.element_size()
        header[k] = {"dtype": _ST_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
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


def _libc():
    """glibc through ctypes, or None where it is not available (other libcs, other systems)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 - glibc-only symbols: fail here, not at the call
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


_LIBC = None


def release_memory():
    """Give freed heap memory back to the OS (glibc's malloc_trim). Blocks are tens to hundreds of MB of
    mid-sized allocations; without this the process's RSS creeps up by ~20 MB per block read."""
    if _libc():
        _libc().malloc_trim(0)


def lean_allocator():
    """Make glibc return large freed blocks to the OS at once. By default its mmap threshold grows after
    each large free until tensors of tens of MB come from the heap, which is then kept: a streamed prune's
    resident memory creeps up by the size of several activation buffers. Costs some page faults per large
    allocation, which is why only --stream does it."""
    if _libc():
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
        _libc().mallopt(M_MMAP_THRESHOLD, 256 << 10)
        _libc().mallopt(M_TRIM_THRESHOLD, 1 << 20)
        _libc().mallopt(M_ARENA_MAX, 2)


def _assign(root: nn.Module, name: str, value: torch.Tensor):
    """Put `value` in place of the parameter or buffer `name` of `root` (whatever device it is on now)."""
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        raise KeyError(name)


def _module_prefix(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise KeyError("module not in model")


# ------------------------------------------------------------------------------------------- one block
class BlockStream:
    """One decoder block that lives on disk: real tensors only between materialize() and release()."""

    def __init__(self, run: "StreamRun", layer: nn.Module, index: int, prefix: str):
        self.run, self.layer, self.index, self.prefix = run, layer, index, prefix
        self.staged: Path | None = None     # this block's current (changed) tensors, in the partial output
        self.depth = 0
        self._snapshot = None

    @property
    def staged_path(self) -> Path:
        return self.run.partial / STAGED.format(self.index)

    def _state_names(self) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in self.layer.state_dict().items()}

    def _fingerprint(self):
        """Identity and version of every tensor: any surgery (new parameter, in-place op) changes it."""
        fp = {}
        for kind, items in (("p", self.layer.named_parameters(remove_duplicate=False)),
                            ("b", self.layer.named_buffers(remove_duplicate=False))):
            for name, t in items:
                try:
                    version = t._version
                except RuntimeError:  # inference tensor: only created by a change
                    version = None
                fp[(kind, name)] = (id(t), version, t.data_ptr(), tuple(t.shape))
        return fp

    @torch.inference_mode(False)
    def materialize(self, device):
        self.depth += 1
        if self.depth > 1:
            return
        t0 = time.perf_counter()
        want = self._state_names()
        if self.staged is not None:
            tensors = {k.removeprefix(self.prefix): v for k, v in read_tensors(self.staged, None, None, device).items()}
        else:
            missing = [k for k in want if self.prefix + k not in self.run.shards]
            if missing:
                raise CompruneError(f"{self.prefix + missing[0]} is not in the shards of {self.run.shards.dir}: the "
                                    "checkpoint does not match config.json, or the method changed the block outside "
                                    "walk.resident (then it cannot stream)")
            src = self.run.shards.read([self.prefix + k for k in want], self.run.dtype, device)
            tensors = {k.removeprefix(self.prefix): v for k, v in src.items()}
        if set(tensors) != set(want):
            raise CompruneError(f"block {self.index}: its tensors on disk do not match the model's modules "
                                f"({sorted(set(tensors) ^ set(want))[:3]}...)")
        for k, v in tensors.items():
            if tuple(v.shape) != tuple(want[k]):
                raise CompruneError(f"block {self.index}: {k} has shape {tuple(v.shape)} on disk but "
                                    f"{tuple(want[k])} in the model: the method changed the block outside "
                                    "walk.resident, so it cannot stream")
            _assign(self.layer, k, v)
        persistent = set(want)
        for name, buf in list(self.layer.named_buffers()):
            if name not in persistent and buf.device != torch.device(device):
                _assign(self.layer, name, buf.to(device))
        self._snapshot = self._fingerprint()
        self.run.stats["block_loads"] += 1
        self.run.stats["read_seconds"] += time.perf_counter() - t0

    @torch.inference_mode(False)
    def release(self, save: bool = True):
        self.depth -= 1
        if self.depth > 0:
            return
        if save and self._fingerprint() != self._snapshot:
            t0 = time.perf_counter()
            _save({self.prefix + k: v for k, v in self.layer.state_dict().items()}, self.staged_path)
            self.staged = self.staged_path
            self.run.stats["block_writes"] += 1
            self.run.stats["write_seconds"] += time.perf_counter() - t0
        persistent = set(self.layer.state_dict())
        for name, p in list(self.layer.named_parameters()):
            _assign(self.layer, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        for name, b in list(self.layer.named_buffers()):
            _assign(self.layer, name, torch.empty(b.shape, dtype=b.dtype, device="meta") if name in persistent
                    else b.to("cpu"))
        self._snapshot = None
        release_memory()


class EmbeddingRows:
    """The input embedding of a streamed model: rows are read from the shard only for the tokens asked for.
    `embed` runs the module's own forward (so scaled embeddings, e.g. Gemma's, stay right) on a table of just
    those rows."""

    def __init__(self, run: "StreamRun", module: nn.Module, name: str):
        self.run, self.module, self.name = run, module, name

    @torch.inference_mode(False)
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        uniq, inverse = torch.unique(ids.cpu(), return_inverse=True)
        table = read_rows(self.run.shards.files[self.name], self.name, uniq.tolist(), self.run.dtype)
        weight, padding = self.module._parameters["weight"], getattr(self.module, "padding_idx", None)
        self.module._parameters["weight"] = nn.Parameter(table.to(ids.device), requires_grad=False)
        if padding is not None:
            self.module.padding_idx = None  # an index into the full table; padding only matters for gradients
        try:
            with torch.inference_mode():
                return self.module(inverse.reshape(ids.shape).to(ids.device))
        finally:
            self.module._parameters["weight"] = weight
            if padding is not None:
                self.module.padding_idx = padding


class TensorStream:
    """A module outside the blocks (e.g. the LM head for the loss-based layer score) read from the shards only
    while resident; it is never changed, so releasing it just drops the tensors."""

    def __init__(self, run: "StreamRun", module: nn.Module, names: dict[str, str]):
        self.run, self.module, self.names = run, module, names  # local name -> shard tensor name
        self.depth = 0
        self.saved = {}

    @torch.inference_mode(False)
    def materialize(self, device):
        self.depth += 1
        if self.depth == 1:
            # keep the meta objects themselves: restoring them on release keeps weight tying (same Parameter)
            self.saved = {k: (self.module._parameters if k in self.module._parameters else self.module._buffers)[k]
                          for k in self.names}
            src = self.run.shards.read(list(self.names.values()), self.run.dtype, device)
            for local, shard_name in self.names.items():
                _assign(self.module, local, src[shard_name])

    @torch.inference_mode(False)
    def release(self, save: bool = True):
        self.depth -= 1
        if self.depth == 0:
            for local, t in self.saved.items():
                (self.module._parameters if local in self.module._parameters else self.module._buffers)[local] = t
            self.saved = {}
            release_memory()


class StreamRun:
    def __init__(self, shards: ShardIndex, dtype: torch.dtype, partial: Path):
        self.shards, self.dtype, self.partial = shards, dtype, partial
        self.stats = {"block_loads": 0, "block_writes": 0, "read_seconds": 0.0, "write_seconds": 0.0}


# ------------------------------------------------------------------------------------------- skeleton
def build_skeleton(model_dir: Path, dtype: torch.dtype, trust_remote_code: bool = False, seqlen: int | None = None,
                   lite: bool = True):
    """The model on the meta device (buffers real, on the CPU), with config and generation config.

    Llama-family models get comprune's plain-PyTorch modules (models/lite.py: same names, same arithmetic)
    when they cover the model and `seqlen`-token calibration windows, so transformers' modeling code - about
    130 MB of resident memory for its imports alone - is never loaded; other models get transformers' classes."""
    from transformers import AutoConfig, GenerationConfig
    from . import models  # noqa: F401 - comprune's per-layer-width configs
    from .loading import _quiet_transformers, _remote_code_error
    from .models import lite as lite_models
    _quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as e:
        if _remote_code_error(e, model_dir) is not None:
            raise _remote_code_error(e, model_dir) from None
        raise CompruneError(f"cannot read the config of {model_dir} ({e.__class__.__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from None
    if lite and not trust_remote_code and lite_models.supports(config, seqlen or 2) is None:
        model = lite_models.build(config, dtype)
        gen = model_dir / "generation_config.json"
        model.generation_config = GenerationConfig.from_pretrained(model_dir) if gen.is_file() else \
            GenerationConfig.from_model_config(config)
        return model
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as e:
        raise CompruneError(f"cannot build the model of {model_dir} from its config.json ({e.__class__.__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from None
    if (model_dir / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
        except (ValueError, OSError):
            pass
    # Buffers were built on the CPU; any that still ended up on meta (e.g. created in __init__ via
    # torch.empty(device=...)) are rebuilt by re-running the owning module's constructor from the config.
    for name, mod in list(model.named_modules()):
        if any(b.device.type == "meta" for b in mod._buffers.values() if b is not None) and hasattr(mod, "rope_init_fn"):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, type(mod)(config=model.config))
    return model.eval()


def _load_resident_tensors(model, adapter, shards: ShardIndex, dtype, run: "StreamRun"):
    """Materialise what lives outside the decoder blocks and is small (final norm, ...). The input embedding
    and the LM head - together as large as many blocks - stay on disk: the embedding gets an EmbeddingRows
    (calibration tokens' rows only) and the head a TensorStream (read while resident, e.g. for the loss-based
    layer score). Returns the blocks' name prefix."""
    layers_prefix = _module_prefix(model, adapter.layers(model))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # one (meta) Parameter for both, so parameter counts see the tie
    names = [k for k in model.state_dict() if not k.startswith(layers_prefix)]
    streamed = set()
    emb = model.get_input_embeddings()
    emb_name = _module_prefix(model, emb) + "weight"
    if emb_name in shards and getattr(emb, "weight", None) is not None and emb.weight.dim() == 2:
        emb._comprune_rows = EmbeddingRows(run, emb, emb_name)
        streamed.add(emb_name)
    head = model.get_output_embeddings()
    if head is not None:
        head_prefix = _module_prefix(model, head)
        local = {k: head_prefix + k for k in head.state_dict()}
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        local = {k: n if n in shards or not (tied and k == "weight") else emb_name for k, n in local.items()}
        if all(n in shards for n in local.values()):
            setattr(head, STREAM_ATTR, TensorStream(run, head, local))
            streamed.update(head_prefix + k for k in local)
    tensors = shards.read([n for n in names if n not in streamed], dtype)
    for k, v in tensors.items():
        _assign(model, k, v)
    left = [k for k, v in model.state_dict().items()
            if not k.startswith(layers_prefix) and k not in streamed and v.device.type == "meta"]
    if left:
        raise CompruneError(f"tensor {left[0]} is missing from the shards of {shards.dir}")
    return layers_prefix


# ------------------------------------------------------------------------------------------- devices
def pick_device(device: str | None) -> str:
    """'auto' with several GPUs: the one with the most free memory (accelerate's get_max_memory)."""
    if device in (None, "auto") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        from accelerate.utils import get_max_memory
        free = {k: v for k, v in get_max_memory().items() if isinstance(k, int)}
        return f"cuda:{max(free, key=free.get)}"
    return device or "cpu"


def check_device_memory(device: torch.device, block_bytes: int, act_bytes: int):
    """One block, its pruned copy, two activation buffers and the scores' workspace must fit on the GPU."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    need = 2 * block_bytes + 2 * act_bytes
    if need > free:
        raise CompruneError(f"{device} has {free / 2**30:.1f} GiB free but one block needs ~{need / 2**30:.1f} GiB "
                            "(block, its pruned copy, activations): lower --nsamples or --calib-batch-size, or use "
                            "--device cpu")


# ------------------------------------------------------------------------------------------- the run
def _partial_dir(out_dir: Path) -> Path:
    from .outputs import sibling
    return sibling(out_dir, "partial-stream")


def _spill_dir(out_dir: Path) -> Path:
    from .outputs import sibling
    return sibling(out_dir, "activations")


def _checkpoint_dir(out_dir: Path) -> Path:
    from .outputs import sibling
    return sibling(out_dir, "checkpoint")


def _finished_blocks(ckpt_dir: Path) -> int:
    state = ckpt_dir / "state.json"
    if not state.is_file():
        return 0
    try:
        return int(json.loads(state.read_text()).get("next_block", 0))
    except (ValueError, OSError):
        return 0


def resolve_stream_source(spec) -> Path:
    """A model directory of safetensors (or an embedded alias, via its cached safetensors)."""
    from .loading import _EMBEDDED, _embedded_cached_dir
    s = str(spec)
    if s.lower() in _EMBEDDED:
        return _embedded_cached_dir(s.lower())
    p = Path(s)
    if not p.is_dir():
        raise CompruneError(f"--stream needs a model directory of safetensors shards (or 'smollm2'), not '{spec}': "
                            "convert it first (e.g. comprune.load(...) then save_pretrained) or drop --stream")
    from .files import read_config
    read_config(p)
    return p


def prune_streaming(model_dir, out_dir, config=None, calibration=None, tokenizer=None, resume: bool = False,
                    force: bool = False, progress: bool = True, dtype="float32", base_model: str | None = None,
                    trust_remote_code: bool = False, data_dir=None, lite: bool = True):
    """Prune the safetensors model in `model_dir` into `out_dir` holding one decoder block at a time.

    Same result as `prune(load(model_dir)); save_pretrained(...)` with the same config and calibration (same
    logits and manifest), but peak memory is the embeddings + head + one block + activations. Progress is
    checkpointed after every block (next to `out_dir`); `resume=True` continues a killed run. `lite=False`
    uses transformers' model classes even where comprune's plain-PyTorch ones (same results, less memory)
    apply. Returns the PruneReport (also written as pruning.json)."""
    from .config import PruneConfig
    from .data import get_calibration
    from .io import MANIFEST, _add_auto_map, _check_target, architecture, publish, write_manifest
    from .loading import resolve_dtype
    from .methods import METHODS
    from .models import get_adapter
    from .models import lite as lite_models
    from .models.adapters import base_model_type
    from .prune import peak_rss_mb, prune
    from .walk import spill_activations

    t0 = time.perf_counter()
    model_dir = resolve_stream_source(model_dir)
    out_dir = Path(out_dir)
    cfg = (config or PruneConfig()).validate()
    method = METHODS.get(cfg.method)
    if method is None:
        raise CompruneError(f"method '{cfg.method}' is not available in this build: use one of {', '.join(METHODS)}")
    if getattr(method, "needs_gradients", False):
        raise CompruneError(f"{cfg.method} needs gradients through the whole model (a backward pass), so it cannot "
                            "stream one block at a time: drop --stream or use a forward-only method (comp, "
                            "layer-drop, wanda-sp)")
    if not getattr(method, "streams", cfg.method not in NOT_STREAMING):
        raise CompruneError(f"{cfg.method} changes blocks outside the one-block walk, so it cannot stream: drop "
                            "--stream or use comp, layer-drop or wanda-sp")
    _check_target(out_dir, force)
    cfg.device = pick_device(cfg.device)
    dtype = resolve_dtype(dtype)
    shards = ShardIndex(model_dir)
    lean_allocator()
    partial, ckpt_dir = _partial_dir(out_dir), _checkpoint_dir(out_dir)
    if resume and (any(partial.glob("model-block-*.safetensors")) or (partial / "model-rest.safetensors").exists()):
        # killed while writing the output: its staged blocks were already moved into output files, so the
        # walk cannot continue from them; start over (same result, the checkpoint only saves time)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        resume = False
    if not resume:
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    own_tokenizer, tokenizer_saved = tokenizer is None, False
    if calibration is None and own_tokenizer:
        # the child also writes the tokenizer into the output: loading it costs ~60 MB of heap (more than the
        # walk's own work on a small model) that this process never has to hold
        try:
            calibration = calibration_in_child(model_dir, cfg, data_dir, tokenizer_out=partial,
                                               trust_remote_code=trust_remote_code)
        except CompruneError:
            if not resume:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        tokenizer_saved = True
    elif calibration is None:
        calibration = get_calibration(tokenizer, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed, data_dir=data_dir)
    # The tokenizer (~40 MB with its vocabulary) is not needed during the walk: loaded again to save it.
    tokenizer = None if own_tokenizer else tokenizer

    model = build_skeleton(model_dir, dtype, trust_remote_code, seqlen=calibration.seqlen,
                           lite=lite)
    adapter = get_adapter(model)
    run = StreamRun(shards, dtype, partial)
    run.stats["modules"] = "comprune-lite" if isinstance(model, lite_models.CausalLM) else "transformers"
    from .files import check_tensors_match
    tied = {_module_prefix(model, model.get_output_embeddings()) + "weight"} \
        if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None else set()
    check_tensors_match({k: tuple(v.shape) for k, v in model.state_dict().items()}, shards.shapes, model_dir,
                        optional=tied)
    layers_prefix = _load_resident_tensors(model, adapter, shards, dtype, run)
    layers = adapter.layers(model)
    done = _finished_blocks(ckpt_dir) if resume else 0
    for i, layer in enumerate(layers):
        stream = BlockStream(run, layer, i, _module_prefix(model, layer))
        setattr(layer, STREAM_ATTR, stream)
        if stream.staged_path.is_file():
            # Blocks finished before the checkpoint are valid; later ones were written after it: redo them.
            if i < done:
                stream.staged = stream.staged_path
            else:
                stream.staged_path.unlink()
    block_bytes = max(sum(t.numel() * t.element_size() for t in layer.state_dict().values()) for layer in layers)
    act_bytes = calibration.input_ids.numel() * model.config.hidden_size * torch.finfo(dtype).bits // 8
    from .loading import resolve_device
    check_device_memory(resolve_device(cfg.device), block_bytes, act_bytes)

    release_memory()  # the calibration text's tokenisation is the largest transient so far
    run.stats["peak_rss_mb_setup"] = peak_rss_mb()  # imports, tokenizer, calibration, embeddings + head
    # On the CPU, activation buffers go to files beside the output: RAM then holds one batch, not N x T x d.
    spill = spill_activations(_spill_dir(out_dir)) if resolve_device(cfg.device).type == "cpu" else nullcontext()
    try:
        with spill:
            model, report = prune(model, tokenizer, cfg, calibration=calibration, progress=progress,
                                  base_model=base_model or str(model_dir), checkpoint_dir=ckpt_dir, resume=resume,
                                  model_digest=_source_digest(model_dir, shards))
    except NotImplementedError as e:
        if "meta" in str(e):
            raise CompruneError(f"{cfg.method} reads block weights outside the one-block walk (walk.resident), so it "
                                "cannot stream: drop --stream or use comp, layer-drop or wanda-sp") from None
        raise

    run.stats["peak_rss_mb_walk"] = peak_rss_mb()
    run.stats["transformers_modeling_imported"] = "transformers.modeling_utils" in sys.modules
    # ---- write the output: kept blocks renumbered, then the rest, all in the partial directory
    weight_map: dict[str, str] = {}
    total_size = 0
    kept_layers = adapter.layers(model)
    kept_index = {getattr(layer, STREAM_ATTR).index for layer in kept_layers}
    for new_idx, layer in enumerate(kept_layers):
        stream: BlockStream = getattr(layer, STREAM_ATTR)
        new_prefix = _module_prefix(model, layer)
        fname = f"model-block-{new_idx:05d}.safetensors"
        want = {new_prefix + k: tuple(v.shape) for k, v in layer.state_dict().items()}
        if stream.staged is not None:
            header = rename_tensors(stream.staged, partial / fname, lambda k: new_prefix + k.removeprefix(stream.prefix))
            stream.staged = None
            got = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        else:
            with torch.inference_mode(False):
                src = shards.read([stream.prefix + k for k in layer.state_dict()], dtype)
            tensors = {new_prefix + k.removeprefix(stream.prefix): v for k, v in src.items()}
            got = {k: tuple(v.shape) for k, v in tensors.items()}
            _save(tensors, partial / fname)
            del src, tensors
        if got != want:
            raise CompruneError(f"block {stream.index}: the written tensors do not match the pruned model "
                                f"({cfg.method} changed the block outside walk.resident, so it cannot stream)")
        for k, shape in want.items():
            weight_map[k] = fname
        total_size += (partial / fname).stat().st_size
        delattr(layer, STREAM_ATTR)
    for i in range(len(layers)):
        if i not in kept_index:
            (partial / STAGED.format(i)).unlink(missing_ok=True)
    rest = _non_block_state(model, layers_prefix, shards, dtype)
    _save(rest, partial / "model-rest.safetensors")
    for k in rest:
        weight_map[k] = "model-rest.safetensors"
    total_size += sum(v.nbytes() if isinstance(v, SourceTensor) else v.numel() * v.element_size()
                      for v in rest.values())
    index = {"metadata": {"total_size": total_size, "total_parameters": report.params_after},
             "weight_map": dict(sorted(weight_map.items()))}
    (partial / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [architecture(model)]
    model.config.save_pretrained(partial)
    if model.can_generate():
        model.generation_config.save_pretrained(partial)
    if own_tokenizer and not tokenizer_saved:
        tokenizer = _load_tokenizer(model_dir, required=False, trust_remote_code=trust_remote_code)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    _add_auto_map(partial, model)
    report.seconds = time.perf_counter() - t0
    report.peak_rss_mb = peak_rss_mb()
    manifest = report.to_dict()
    manifest["base_model_type"] = base_model_type(model.config)
    manifest["streaming"] = {**run.stats, "source_bytes": sum(f.stat().st_size for f in set(shards.files.values())),
                             "output_bytes": total_size}
    write_manifest(partial / MANIFEST, manifest)
    model.comprune_report = report

    # ---- publish atomically
    publish(partial, out_dir)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return report


def _source_digest(model_dir: Path, shards: ShardIndex) -> str:
    """The identity of the streamed source for resume fingerprints: its resolved path and weight files."""
    from .files import weights_digest_sample
    return f"{Path(model_dir).resolve()}|{weights_digest_sample(set(shards.files.values()))}"


def calibration_in_child(model_dir: Path, cfg, data_dir=None, tokenizer_out: Path | None = None,
                         trust_remote_code: bool = False):
    """The calibration windows, tokenised in a child process. Loading a tokenizer and tokenising a text
    sample leaves ~30 MB of heap behind in the process that did it (more than a block of a small model);
    the child takes that with it. Same ids as in-process tokenisation (same tokenizer, text and seed).
    With `tokenizer_out`, the child also saves the tokenizer there (save_pretrained)."""
    import subprocess
    import sys
    import tempfile
    from safetensors.torch import load_file
    from .data import Calibration
    with tempfile.TemporaryDirectory(prefix="comprune-calib-") as tmp:
        out = Path(tmp) / "ids.safetensors"
        args = [str(model_dir), cfg.calib, str(cfg.nsamples), str(cfg.seqlen), str(cfg.seed), str(data_dir or ""),
                str(out), str(tokenizer_out or ""), "1" if trust_remote_code else ""]
        code = "import sys; from comprune.stream import _calibration_child; _calibration_child(*sys.argv[1:])"
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
            msg = next((ln.removeprefix("comprune: error: ") for ln in reversed(lines)
                        if ln.startswith("comprune: error: ")), None)
            raise CompruneError(msg or f"tokenising the calibration text failed: {lines[-1] if lines else r.returncode}")
        ids = load_file(str(out))["input_ids"]
    return Calibration(ids, cfg.calib, cfg.seed)


def _calibration_child(model_dir, source, nsamples, seqlen, seed, data_dir, out, tokenizer_out="", trust=""):
    import sys
    from safetensors.torch import save_file
    from .data import get_calibration
    try:
        tokenizer = _load_tokenizer(Path(model_dir), required=True, trust_remote_code=bool(trust))
        calib = get_calibration(tokenizer, source, int(nsamples), int(seqlen), int(seed), data_dir=data_dir or None)
    except CompruneError as e:
        print(f"comprune: error: {e}", file=sys.stderr)
        sys.exit(2)
    save_file({"input_ids": calib.input_ids.contiguous()}, out)
    if tokenizer_out:
        tokenizer.save_pretrained(tokenizer_out)


def _load_tokenizer(model_dir: Path, required: bool, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    from .loading import _remote_code_error
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as e:
        remote = _remote_code_error(e, model_dir)
        if remote is not None:
            raise remote from None
        if required:
            raise CompruneError(f"cannot load the tokenizer of {model_dir} ({e.__class__.__name__}): pass "
                                "calibration token ids or a tokenizer") from None
        return None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _non_block_state(model, layers_prefix: str, shards: ShardIndex, dtype) -> dict:
    """State dict outside the blocks: resident tensors as they are, streamed ones (embedding, head) as
    SourceTensor references copied from the shards when written. Tied weights are written once under their
    first name (model.embed_tokens, as transformers' save_pretrained does)."""
    out, seen = {}, set()
    head = model.get_output_embeddings()
    tied_head = None
    if head is not None and getattr(model.config, "tie_word_embeddings", False):
        tied_head = _module_prefix(model, head) + "weight"
    for k, v in model.state_dict().items():
        if k.startswith(layers_prefix) or k == tied_head:
            continue
        if v.device.type == "meta":
            src = k if k in shards else None
            if src is None:
                raise CompruneError(f"tensor {k} is missing from the shards of {shards.dir}")
            out[k] = SourceTensor(shards.files[src], src, dtype)
            continue
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v
    return out


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
