"""A model whose tensors live in safetensors shards: a skeleton on the meta device, filled one block at a time.

`build_skeleton` builds the model from its config.json on the meta device: comprune's plain-PyTorch modules
for the Llama family (models/lite.py: same names and arithmetic, without transformers' ~130 MB modeling
imports), transformers' classes otherwise (accelerate's `init_empty_weights`); buffers such as rotary
`inv_freq` are real, on the CPU. `load_resident_tensors` then reads the small tensors outside the blocks
(final norm), leaves the input embedding on disk (`EmbeddingRows`: only the calibration tokens' rows are
read) and the LM head too (`TensorStream`: read only while resident), and `attach_block_streams` gives every
decoder block a `BlockStream`. The run is the walk's residency policy (walk.Residency): holding a module
calls its stream's `materialize` on enter (read only that block's tensors, on the compute device) and
`release` on exit (back to meta tensors of the block's current shapes).
A block that the method changed while resident is written to the partial output as `block-NNNNN.safetensors`
before it is released; the next time it is entered it is read from there.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from . import deferred
from .errors import CompruneError
from .loading import quiet_transformers, remote_code_error
from .memory import release_memory
from .models import lite as lite_models
from .models import per_layer_config
from .walk import Residency
from .shards import ShardIndex, SourceTensor, read_rows, read_tensors, save_tensors

STAGED = "block-{:05d}.safetensors"


def assign(root: nn.Module, name: str, value: torch.Tensor):
    """Put `value` in place of the parameter or buffer `name` of `root` (whatever device it is on now)."""
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        raise KeyError(name)


def module_prefix(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise KeyError("module not in model")


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
            disk = {self.run.disk_name(self.prefix + k): k for k in want}
            missing = [n for n in disk if n not in self.run.shards]
            if missing:
                raise CompruneError(f"{missing[0]} is not in the shards of {self.run.shards.dir}: the "
                                    "checkpoint does not match config.json, or the method changed the block outside "
                                    "the walk's hold (then it cannot stream)")
            src = self.run.shards.read(list(disk), self.run.dtype, device)
            tensors = {disk[n]: v for n, v in src.items()}
        if set(tensors) != set(want):
            raise CompruneError(f"block {self.index}: its tensors on disk do not match the model's modules "
                                f"({sorted(set(tensors) ^ set(want))[:3]}...)")
        for k, v in tensors.items():
            if tuple(v.shape) != tuple(want[k]):
                raise CompruneError(f"block {self.index}: {k} has shape {tuple(v.shape)} on disk but "
                                    f"{tuple(want[k])} in the model: the method changed the block outside "
                                    "the walk's hold, so it cannot stream")
            assign(self.layer, k, v)
        persistent = set(want)
        for name, buf in list(self.layer.named_buffers()):
            if name not in persistent and buf.device != torch.device(device):
                assign(self.layer, name, buf.to(device))
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
            save_tensors({self.prefix + k: v for k, v in self.layer.state_dict().items()}, self.staged_path)
            self.staged = self.staged_path
            self.run.stats["block_writes"] += 1
            self.run.stats["write_seconds"] += time.perf_counter() - t0
        persistent = set(self.layer.state_dict())
        for name, p in list(self.layer.named_parameters()):
            assign(self.layer, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        for name, b in list(self.layer.named_buffers()):
            assign(self.layer, name, torch.empty(b.shape, dtype=b.dtype, device="meta") if name in persistent
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
                assign(self.module, local, src[shard_name])

    @torch.inference_mode(False)
    def release(self, save: bool = True):
        self.depth -= 1
        if self.depth == 0:
            for local, t in self.saved.items():
                (self.module._parameters if local in self.module._parameters else self.module._buffers)[local] = t
            self.saved = {}

            release_memory()


class _Held:
    """A streamed module held by the walk: read on enter, staged (if changed) and dropped on exit. Re-entrant:
    a nested hold of the same block keeps what the step changed."""

    def __init__(self, stream, device):
        self.stream, self.device = stream, torch.device(device)

    def __enter__(self):
        self.stream.materialize(self.device)
        return self.stream

    def __exit__(self, *exc):
        self.stream.release(save=exc[0] is None)
        return False


class StreamRun(Residency):
    """A streamed prune: its shards, its staged blocks, and the residency policy the walk holds modules by."""
    streamed = True

    def __init__(self, shards: ShardIndex, dtype: torch.dtype, partial: Path):
        self.shards, self.dtype, self.partial = shards, dtype, partial
        self.disk_name = lambda name: name  # the checkpoint's name of a state-dict entry (adapter.disk_name)
        self.stats = {"block_loads": 0, "block_writes": 0, "read_seconds": 0.0, "write_seconds": 0.0}
        self.streams: dict[nn.Module, object] = {}  # the blocks and the LM head that live on disk
        self.rows: EmbeddingRows | None = None      # the input embedding's rows, read per token

    def hold(self, module: nn.Module, device):
        stream = self.streams.get(module)
        return super().hold(module, device) if stream is None else _Held(stream, device)

    def embedding_rows(self, model):
        return self.rows


def build_skeleton(model_dir: Path, dtype: torch.dtype, trust_remote_code: bool = False, seqlen: int | None = None,
                   lite: bool = True):
    """The model on the meta device (buffers real, on the CPU), with config and generation config.

    Llama-family models get comprune's plain-PyTorch modules (models/lite.py: same names, same arithmetic)
    when they cover the model and `seqlen`-token calibration windows, so transformers' modeling code - about
    130 MB of resident memory for its imports alone - is never loaded; other models get transformers' classes."""
    quiet_transformers()
    try:
        config = per_layer_config(model_dir) or AutoConfig.from_pretrained(model_dir,
                                                                           trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as e:
        if remote_code_error(e, model_dir) is not None:
            raise remote_code_error(e, model_dir) from None
        raise CompruneError(f"cannot read the config of {model_dir} ({e.__class__.__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from None
    if lite and not trust_remote_code and lite_models.supports(config, seqlen or 2) is None:
        model = lite_models.build(config, dtype)
        gen = model_dir / "generation_config.json"
        model.generation_config = GenerationConfig.from_pretrained(model_dir) if gen.is_file() else \
            GenerationConfig.from_model_config(config)
        return model
    try:
        with deferred.init_empty_weights()(include_buffers=False):
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


def load_resident_tensors(model, adapter, shards: ShardIndex, dtype, run: "StreamRun"):
    """Materialise what lives outside the decoder blocks and is small (final norm, ...). The input embedding
    and the LM head - together as large as many blocks - stay on disk: the embedding gets an EmbeddingRows
    (calibration tokens' rows only) and the head a TensorStream (read while resident, e.g. for the loss-based
    layer score). Returns the blocks' name prefix."""
    layers_prefix = module_prefix(model, adapter.layers(model))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # one (meta) Parameter for both, so parameter counts see the tie
    names = [k for k in model.state_dict() if not k.startswith(layers_prefix)]
    streamed = set()
    emb = model.get_input_embeddings()
    emb_name = module_prefix(model, emb) + "weight"
    if emb_name in shards and getattr(emb, "weight", None) is not None and emb.weight.dim() == 2:
        run.rows = EmbeddingRows(run, emb, emb_name)
        streamed.add(emb_name)
    head = model.get_output_embeddings()
    if head is not None:
        head_prefix = module_prefix(model, head)
        local = {k: head_prefix + k for k in head.state_dict()}
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        local = {k: n if n in shards or not (tied and k == "weight") else emb_name for k, n in local.items()}
        if all(n in shards for n in local.values()):
            run.streams[head] = TensorStream(run, head, local)
            streamed.update(head_prefix + k for k in local)
    tensors = shards.read([n for n in names if n not in streamed], dtype)
    for k, v in tensors.items():
        assign(model, k, v)
    left = [k for k, v in model.state_dict().items()
            if not k.startswith(layers_prefix) and k not in streamed and v.device.type == "meta"]
    if left:
        raise CompruneError(f"tensor {left[0]} is missing from the shards of {shards.dir}")
    return layers_prefix


def attach_block_streams(model, adapter, run: StreamRun, done: int) -> list[nn.Module]:
    """Give every decoder block its BlockStream. A block staged by an interrupted run counts only if it was
    finished before the checkpoint (`done` blocks); later ones were written after it and are redone."""
    layers = adapter.layers(model)
    for i, layer in enumerate(layers):
        stream = BlockStream(run, layer, i, module_prefix(model, layer))
        run.streams[layer] = stream
        if stream.staged_path.is_file():
            if i < done:
                stream.staged = stream.staged_path
            else:
                stream.staged_path.unlink()
    return list(layers)


def non_block_state(model, layers_prefix: str, shards: ShardIndex, dtype) -> dict:
    """State dict outside the blocks: resident tensors as they are, streamed ones (embedding, head) as
    SourceTensor references copied from the shards when written. Tied weights are written once under their
    first name (model.embed_tokens, as transformers' save_pretrained does)."""
    out, seen = {}, set()
    head = model.get_output_embeddings()
    tied_head = None
    if head is not None and getattr(model.config, "tie_word_embeddings", False):
        tied_head = module_prefix(model, head) + "weight"
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

