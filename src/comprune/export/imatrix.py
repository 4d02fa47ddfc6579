"""Importance matrices for the quantized GGUF types: per input column of every linear layer, the mean squared
input over calibration windows (what llama.cpp's imatrix tool collects), computed on the model being exported
(the pruned one), from the very windows its prune saw (its pruning.json calibration record), so quantization
weighs the same data the prune did.

The result is cached beside the model (`imatrix/<calibration sha256>.safetensors`: a folder, so the model's own
weights stay the only *.safetensors at its top), so exporting one model at many types collects once.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import CompruneError, require
from ..files import read_config
from .gguf import prepare
from .gguf_arch import spec_for
from .gguf_hparams import model_family

CACHE = "imatrix"


@torch.no_grad()
def collect(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Module name -> mean squared input per column, for every nn.Linear of `model` over `windows` [N, T]."""
    sums, counts, hooks = {}, {}, []

    def hook(name):
        def record(_, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    try:
        device = next(model.parameters()).device
        for i in range(0, windows.shape[0], batch_size):
            model(windows[i:i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    return {k: (v / counts[k]).cpu() for k, v in sums.items()}


def gguf_names(model_dir, columns: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The module-name importances as GGUF tensor name -> one float per column of the tensor as written (MLP
    inputs padded to the file's width with the mean importance: the padded columns are zero weights)."""
    model_dir = Path(model_dir)
    cfg, arch, tensors, widths, file_widths = prepare(model_dir, "q8_0")
    spec = spec_for(model_family(cfg))
    tied = cfg.get("tie_word_embeddings") or "lm_head.weight" not in tensors
    out = {}
    for name, v in columns.items():
        if name == "lm_head":
            out["token_embd.weight" if tied and not spec.output_required else "output.weight"] = v
            continue
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"]:
            continue
        i, hf = int(parts[2]), ".".join(parts[3:])
        if hf not in spec.layer_names:
            continue  # e.g. experts: quantized without an importance matrix
        if hf == "mlp.down_proj" and file_widths[i] > v.numel():
            v = torch.cat([v, v.new_full((file_widths[i] - v.numel(),), float(v.mean()) if v.numel() else 1.0)])
        out[f"blk.{i}.{spec.layer_names[hf]}.weight"] = v
    return {k: v.float().numpy() for k, v in out.items()}


def imatrix_for(model_dir, windows: torch.Tensor | None = None, model=None, batch_size: int = 8,
                data_dir=None) -> dict[str, np.ndarray]:
    """The importance matrix of `model_dir` in GGUF names: from the cache beside it when it was made from the
    same windows, else collected (and cached). `windows`: [N, T] token ids; by default the calibration its
    pruning.json records, drawn again and checked by sha256. `model`: the loaded model, if at hand."""
    from safetensors.torch import load_file, save_file
    model_dir = Path(model_dir)
    if windows is None:
        windows = recorded_windows(model_dir, data_dir)
    sha = _sha(windows)
    cache = model_dir / CACHE / f"{sha[:16]}.safetensors"
    if cache.is_file():
        from safetensors import safe_open
        with safe_open(str(cache), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("calibration_sha256") == sha and meta.get("weights") == _weights_stamp(model_dir):
            return {k: v.numpy() for k, v in load_file(str(cache)).items()}
    if model is None:
        from ..loading import load
        model = load(str(model_dir))[0]
    out = gguf_names(model_dir, collect(model, windows, batch_size))
    try:
        cache.parent.mkdir(exist_ok=True)
        save_file({k: torch.from_numpy(v) for k, v in out.items()}, str(cache),
                  metadata={"calibration_sha256": sha, "windows": str(tuple(windows.shape)),
                            "weights": _weights_stamp(model_dir)})
    except OSError:
        pass  # a read-only model directory: the matrix is used, not cached
    return out


def _weights_stamp(model_dir: Path) -> str:
    """Which weights the matrix was collected on: the safetensors files' names, sizes and times."""
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(model_dir.glob("*.safetensors")))


def _sha(windows: torch.Tensor) -> str:
    import hashlib
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()


def has_calibration(model_dir) -> bool:
    """Whether the model's pruning.json records the calibration windows its prune used."""
    manifest = Path(model_dir) / "pruning.json"
    try:
        rec = json.loads(manifest.read_text()).get("calibration") or {}
    except (OSError, ValueError):
        return False
    return {"source", "nsamples", "seqlen", "seed"} <= set(rec)


def recorded_windows(model_dir: Path, data_dir=None) -> torch.Tensor:
    """The calibration windows the prune of `model_dir` used, from its pruning.json record, checked by sha256."""
    from ..calibration import load_tokenizer
    from ..data import get_calibration
    manifest = model_dir / "pruning.json"
    require(manifest.is_file(), f"{model_dir} has no pruning.json to take calibration windows from: pass "
                                "--imatrix-data (a calibration source such as c4) or export without --imatrix")
    rec = json.loads(manifest.read_text()).get("calibration") or {}
    require({"source", "nsamples", "seqlen", "seed"} <= set(rec),
            f"{manifest} records no calibration windows: pass --imatrix-data")
    read_config(model_dir)
    tok = load_tokenizer(model_dir, required=True)
    calib = get_calibration(tok, rec["source"], int(rec["nsamples"]), int(rec["seqlen"]), int(rec["seed"]), data_dir)
    if rec.get("sha256") and calib.sha256() != rec["sha256"]:
        raise CompruneError(f"the calibration windows drawn again for {model_dir} differ from its prune's (sha256 "
                            f"{calib.sha256()[:12]} vs {rec['sha256'][:12]}): pass the same data dir (--data-dir)")
    return calib.input_ids


def source_windows(model_dir, source: str, nsamples: int = 128, seqlen: int = 128, seed: int = 0,
                   data_dir=None) -> torch.Tensor:
    """[N, T] calibration windows of `source` in the model's own tokenization (the prune's defaults)."""
    from ..calibration import load_tokenizer
    from ..data import get_calibration
    tok = load_tokenizer(Path(model_dir), required=True)
    return get_calibration(tok, source, nsamples, seqlen, seed, data_dir).input_ids
