"""Saving pruned models: safetensors + config + tokenizer + pruning.json, written to a temporary directory
and renamed, so a crash never leaves a directory that looks complete."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .card import write_card
from .errors import CompruneError
from .models.adapters import base_model_type, get_adapter
from .models.families import family_of
from .models.lite import CausalLM
from .outputs import check_output, dump_json, follow_umask, hidden_prefix, json_text
from .shards import ShardIndex

MANIFEST = "pruning.json"
MODELING_FILE = Path(__file__).parent / "models" / "modeling_comprune.py"


def check_target(out_dir: Path, force: bool):
    """Refuse a bad output directory before any work (outputs.check_output)."""
    check_output(Path(out_dir), force)


def add_auto_map(tmp: Path, model):
    """Non-uniform models: ship the self-contained modeling file so stock transformers can load them
    with trust_remote_code=True (import comprune makes that unnecessary), and vLLM's Transformers backend through
    `AutoModel` and `per_layer_config`. config.json names the base model_type: stock AutoTokenizer, which always
    reads the config first, then needs no remote code."""
    if "intermediate_sizes" not in model.config.to_dict():
        return
    family = family_of(model.config)
    config_class, model_class = family.transformers
    (tmp / "modeling_comprune.py").write_text(
        MODELING_FILE.read_text(encoding="utf-8") +
        f"\n\nadd_family({family.model_type!r}, {config_class!r}, {model_class!r}, {family.width_key!r})\n",
        encoding="utf-8")
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_type"] = base_model_type(model.config)
    cfg["auto_map"] = {"AutoConfig": f"modeling_comprune.{type(model.config).__name__}",
                       "AutoModelForCausalLM": f"modeling_comprune.{architecture(model)}",
                       # the base model: what vLLM's Transformers backend builds (under its own LM head)
                       "AutoModel": f"modeling_comprune.{architecture(model).replace('ForCausalLM', 'Model')}"}
    cfg_path.write_text(json_text(cfg, indent=2, sort_keys=True) + "\n")


def architecture(model) -> str:
    """The transformers class name a model's checkpoint is for (a streamed prune's plain-PyTorch modules
    carry it as `architecture`)."""
    return model.architecture if isinstance(model, CausalLM) else type(model).__name__


def write_manifest(path: Path, manifest: dict):
    # json.dump streams its pieces to the file: dumps would first hold them all (an indented manifest of a
    # few thousand kept neurons per block is ~10 MB of small strings, more than a streamed prune's block)
    with open(path, "w") as f:
        dump_json(manifest, f, indent=2, sort_keys=True)
        f.write("\n")


def publish(tmp: Path, out_dir: Path):
    """Rename a finished temporary directory to its final name, replacing an old one (checked by the caller).
    The temporary directory was created 0700: the output gets the umask's modes."""
    follow_umask(tmp)
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=hidden_prefix(out_dir) + "old-", dir=out_dir.parent))
        os.replace(out_dir, trash / "old")
        os.replace(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def save_dtype(model, requested: str | None = "source") -> torch.dtype:
    """The precision saved weights are written in: "source" (default: the precision the model was loaded from,
    when comprune.load recorded it, else the one it computes in), "compute", or a dtype name."""
    computed = next(model.parameters()).dtype
    if requested in (None, "source"):
        name = (getattr(model, "comprune_precision", None) or {}).get("source_dtype")
        return _SAVE_DTYPES.get(name, computed)
    if requested == "compute":
        return computed
    if requested not in _SAVE_DTYPES:
        raise CompruneError(f"unknown save dtype '{requested}': use source, compute, float32, float16 or bfloat16")
    return _SAVE_DTYPES[requested]


_SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_weights(model, tmp: Path, target: torch.dtype, kept_layers: list[int] | None = None):
    """model.save_pretrained in `target` precision, the model itself unchanged afterwards. Wider than the model's
    (bf16 computed, float32 source): the parameters are cast in place and back, which is exact both ways, so no
    second copy is held; a parameter the prune left as it was is written as the source holds it (the bf16 copy
    of it rounded the source's bits away), as a streamed prune copies it. Narrower: a state dict copy in `target`
    (smaller than the model)."""
    computed = next(model.parameters()).dtype
    if target == computed:
        model.save_pretrained(tmp, safe_serialization=True)
    elif torch.finfo(target).bits >= torch.finfo(computed).bits:
        params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
        source = _SourceTensors(model, kept_layers)
        try:
            for name, p in params:
                p.data = source.untouched(name, p.data, target)
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            for _, p in params:
                p.data = p.data.to(computed)
    else:
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        del state
        cfg_path = tmp / "config.json"  # transformers names the model's own dtype there
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = str(target).removeprefix("torch.")
        cfg_path.write_text(json_text(cfg, indent=2, sort_keys=True) + "\n")


def save_pretrained(model, tokenizer, out_dir, report=None, force: bool = False, dtype: str | None = "source",
                    _crash_after_weights=False) -> Path:
    """Atomically write a loadable model directory; `report` (PruneReport or dict) becomes pruning.json.
    Weights are written in `dtype` (see save_dtype); the model in memory keeps its own precision."""
    out_dir = Path(out_dir)
    check_target(out_dir, force)
    target = save_dtype(model, dtype)
    tmp = Path(tempfile.mkdtemp(prefix=hidden_prefix(out_dir) + "partial-", dir=out_dir.parent))
    try:
        save_weights(model, tmp, target, getattr(report, "kept_layers", None) if report is not None else None)
        if _crash_after_weights:  # test hook: a crash between weights and manifest
            raise KeyboardInterrupt("simulated crash")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        add_auto_map(tmp, model)
        report = report if report is not None else getattr(model, "comprune_report", None)
        if report is not None:
            if isinstance(getattr(report, "precision", None), dict):  # the report (--json) says it too
                report.precision["saved_dtype"] = str(target).removeprefix("torch.")
            manifest = report.to_dict() if hasattr(report, "to_dict") else dict(report)
            if isinstance(manifest.get("precision"), dict):
                manifest["precision"] = {**manifest["precision"], "saved_dtype": str(target).removeprefix("torch.")}
            manifest["base_model_type"] = base_model_type(model.config)
            write_manifest(tmp / MANIFEST, manifest)
            write_card(tmp, manifest, out_dir.name)
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


class _SourceTensors:
    """The tensors of the directory the model was loaded from (comprune.load records it), by the pruned model's
    parameter names: a kept block's index is mapped back to its source index."""

    def __init__(self, model, kept_layers: list[int] | None):
        src = getattr(model, "comprune_source", None)
        self.files, self.shapes = {}, {}
        if src is not None and any(Path(src).glob("*.safetensors")):  # pickle sources are written as computed
            try:
                index = ShardIndex(Path(src))
                self.files, self.shapes = index.files, index.shapes
            except CompruneError:
                pass
        self.kept = list(kept_layers) if kept_layers is not None else None
        self.prefix = None
        if self.files:
            layers = get_adapter(model).layers(model)
            self.prefix = next((n for n, m in model.named_modules() if m is layers), None)

    def name(self, name: str) -> str:
        if self.kept is None or not self.prefix or not name.startswith(self.prefix + "."):
            return name
        index, rest = name[len(self.prefix) + 1:].split(".", 1)
        return f"{self.prefix}.{self.kept[int(index)]}.{rest}"

    def untouched(self, name: str, value: torch.Tensor, target: torch.dtype) -> torch.Tensor:
        """`value` in `target`: the source's own tensor where `value` is it in the computed precision."""
        source = self.name(name)
        if source in self.files and self.shapes.get(source) == tuple(value.shape):  # a sliced tensor is not read
            with safe_open(str(self.files[source]), "pt") as f:
                src = f.get_tensor(source)
            if src.dtype == target and torch.equal(src.to(value.dtype), value.cpu()):
                return src.to(value.device)
        return value.to(target)


def read_manifest(model_dir) -> dict | None:
    p = Path(model_dir) / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else None


def weights_digest(model_dir) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order, whatever the shard layout:
    equal digests mean the same weights (used to check that a streamed prune equals the in-memory one)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CompruneError(f"{model_dir} has no .safetensors files: pass a model directory saved by comprune")
    digest = hashlib.sha256()
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), "pt")) for f in files]
        where = {k: h for h in handles for k in h.keys()}
        for name in sorted(where):
            t = where[name].get_tensor(name).contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
