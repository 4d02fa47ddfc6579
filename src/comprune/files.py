"""Checks on a model directory's files before anything loads them (docs/reliability.md):

- `model_file` / `check_model_dir` / `read_model_file`: only regular files that resolve inside the model
  directory are read (no link to a file elsewhere, no FIFO or device), or one line naming the file;
- `read_config`: config.json parsed (the directory checked first), or one line naming it;
- `check_safetensors`: every safetensors file complete (header readable, data as long as the header says);
- `check_gguf`: the same for a .gguf file;
- `refuse_pickles`: a directory whose weights are only pickles (.bin/.pt/.pth) needs --allow-pickle;
- `weights_digest_sample`: a cheap identity of weight files (headers + strided bytes) for resume fingerprints;
- `tensor_digest_sample`: the same for in-memory tensors.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import mmap
import os
import stat
import struct
from pathlib import Path

from .errors import CompruneError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def cache_dir() -> Path:
    """comprune's cache: $COMPRUNE_CACHE, else $XDG_CACHE_HOME/comprune, else ~/.cache/comprune."""
    if os.environ.get("COMPRUNE_CACHE"):
        return Path(os.environ["COMPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comprune"


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device"}


def _allowed_roots(model_dir: Path) -> list[str]:
    """Where a model directory's files may resolve: inside it, and for a Hugging Face cache snapshot
    (`.../snapshots/REV`, whose files are links to `../../blobs/HASH`) its repository's blob store."""
    root = os.path.realpath(model_dir)
    roots = [root]
    if Path(root).parent.name == "snapshots":
        roots.append(str(Path(root).parent.parent / "blobs"))
    return roots


def model_file(model_dir, name) -> Path | None:
    """`model_dir/name` when it is a regular file (or a directory) that resolves inside the model directory,
    None when absent; else one line naming it. A link to a file elsewhere would put that file's content into
    what comprune writes (a GGUF a user may publish), and opening a FIFO blocks forever: neither is read."""
    model_dir = Path(model_dir)
    path = model_dir / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CompruneError(f"cannot read {path} ({e.strerror or e}): check the file") from None
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CompruneError(f"{path} is a symbolic link loop: replace it with the file it should be, or "
                                    "remove it") from None
            raise CompruneError(f"{path} is a symbolic link to nothing ({e.strerror or e}): replace it with the "
                                "file it should be, or remove it") from None
        target = os.path.realpath(path)
        if not any(target == r or target.startswith(r.rstrip(os.sep) + os.sep) for r in _allowed_roots(model_dir)):
            raise CompruneError(f"{path} links to {target}, outside the model directory: comprune reads only the "
                                f"model directory's own files; copy the file into {model_dir} to use it")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise CompruneError(f"{path} is {kind}, not a regular file: remove it or replace it with the file it "
                            "should be")
    return path


def check_model_dir(model_dir) -> None:
    """`model_file` for every file of a model directory and its subdirectories (transformers and gguf read
    files comprune does not name: tokenizer_config.json, chat_template.jinja, additional_chat_templates/...).
    Hidden subdirectories (.git, .cache) are not read by any loader and are not searched."""
    model_dir = Path(model_dir)
    pending = [Path()]
    while pending:
        rel = pending.pop()
        try:
            names = sorted(os.listdir(model_dir / rel))
        except OSError as e:
            raise CompruneError(f"cannot list {model_dir / rel} ({e.strerror or e}): check the directory") from None
        for name in names:
            path = model_file(model_dir, rel / name)
            if path is not None and not path.is_symlink() and path.is_dir() and not name.startswith("."):
                pending.append(rel / name)


def read_model_file(model_dir, name) -> bytes | None:
    """The bytes of `model_dir/name` (None when absent), read only when `model_file` allows it. Opened
    non-blocking and checked again on the open file: a FIFO swapped in after the check cannot block."""
    path = model_file(model_dir, name)
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise CompruneError(f"cannot read {path} ({e.strerror or e}): check the file") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CompruneError(f"{path} is not a regular file: replace it with the file it should be")
    with os.fdopen(fd, "rb") as f:
        try:
            return f.read()
        except OSError as e:
            raise CompruneError(f"cannot read {path} ({e.strerror or e}): check the file") from None


def read_config(model_dir) -> dict:
    """config.json of a model directory, after `check_model_dir`: every loader reads it first, before
    transformers or gguf open any other file of the directory."""
    path = Path(model_dir) / "config.json"
    data = None
    if Path(model_dir).is_dir():
        check_model_dir(model_dir)
        data = read_model_file(model_dir, "config.json")
    if data is None:
        raise CompruneError(f"{model_dir} has no config.json: pass a model directory saved by comprune or "
                            "transformers")
    try:
        cfg = json.loads(data.decode("utf-8"))
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
