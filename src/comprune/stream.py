"""Streaming prune: prune a model stored as safetensors shards without ever holding it whole (orchestration).

The model is a skeleton on the meta device whose blocks are read from the shards only while resident
(skeleton.py); the calibration ids come from a child process (calibration.py); shard reading and writing is
shards.py, the allocator settings memory.py. The usual `prune()` then runs unchanged on the skeleton: its
budget, layer stage, neuron stage, checkpoints, block dropping and config rewrite only read shapes.

Afterwards the kept blocks are renumbered (`model.layers.{new_idx}.*`: the staged file's header is rewritten
in place, the tensor data is not copied; blocks the method never changed are copied from the source shards one
at a time), the non-block tensors, `model.safetensors.index.json`, config (+ modeling file when MLP widths
differ), generation config, tokenizer and `pruning.json` are written, and the partial directory is renamed to
the output: a killed run never leaves a directory that looks complete. With `resume=True` an interrupted run
continues from its checkpoint; blocks finished before the kill are re-read from the partial output.

Peak memory: the runtime + one block (+ its pruned copy and the scores' f x f Gram matrices) + one batch
of activations (the rest are spilled to files), instead of the whole model.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from .calibration import calibration_in_child, load_tokenizer
from .checkpoint import checkpoint_dir
from .config import PruneConfig
from .data import get_calibration, uses_self
from .devices import check_device_memory, dtype_name, pick_device, resolve_device, resolve_precision
from .errors import CompruneError
from .files import check_tensors_match, read_config, weights_digest_sample
from .card import write_card
from .io import MANIFEST, add_auto_map, architecture, check_target, publish, write_manifest
from .io import save_dtype as resolve_save_dtype
from .loading import EMBEDDED, embedded_cached_dir, source_dtype
from .memory import lean_allocator, peak_rss_mb, release_memory
from . import registry
from .models import get_adapter
from .models import lite as lite_models
from .models.adapters import base_model_type
from .outputs import json_text, sibling
from .prune import prune
from .shards import INDEX, ShardIndex, SourceTensor, read_header_and_base, read_tensors, rename_tensors, save_tensors
from .skeleton import (
    STAGED,
    BlockStream,
    StreamRun,
    attach_block_streams,
    build_skeleton,
    load_resident_tensors,
    module_prefix,
    non_block_state,
)
from .walk import ActivationStore

FLOAT_NAMES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # safetensors dtype names


def _streamers() -> str:
    return ", ".join(m.name for m in registry.methods().values() if m.streams and not m.needs_gradients)


def can_stream(method_name: str) -> bool:
    """Whether `comprune prune --stream` accepts this method (forward-only and block-local: its record says)."""
    method = registry.methods().get(method_name)
    return method is not None and method.streams and not method.needs_gradients


def check_streamable(method_name: str):
    """One line naming why a method cannot stream, or nothing."""
    method = registry.get(method_name)
    if method.needs_gradients:
        raise CompruneError(f"{method_name} needs gradients through the whole model (a backward pass), so it cannot "
                            f"stream one block at a time: drop --stream or use a forward-only method ({_streamers()})")
    if not method.streams:
        raise CompruneError(f"{method_name} changes blocks outside the one-block walk, so it cannot stream: drop "
                            f"--stream or use one of {_streamers()}")


# ------------------------------------------------------------------------------------------- paths
def partial_dir(out_dir: Path) -> Path:
    return sibling(out_dir, "partial-stream")


def spill_dir(out_dir: Path) -> Path:
    return sibling(out_dir, "activations")


def finished_blocks(ckpt_dir: Path) -> int:
    state = ckpt_dir / "state.json"
    if not state.is_file():
        return 0
    try:
        return int(json.loads(state.read_text()).get("next_block", 0))
    except (ValueError, OSError):
        return 0


def resolve_stream_source(spec) -> Path:
    """A model directory of safetensors (or an embedded alias, via its cached safetensors)."""
    s = str(spec)
    if s.lower() in EMBEDDED:
        return embedded_cached_dir(s.lower())
    p = Path(s)
    if not p.is_dir():
        raise CompruneError(f"--stream needs a model directory of safetensors shards (or 'smollm2'), not '{spec}': "
                            "convert it first (e.g. comprune.load(...) then save_pretrained) or drop --stream")
    read_config(p)
    return p


# ------------------------------------------------------------------------------------------- the run
def prune_streaming(model_dir, out_dir, config=None, calibration=None, tokenizer=None, resume: bool = False,
                    force: bool = False, progress: bool = True, dtype="float32", base_model: str | None = None,
                    trust_remote_code: bool = False, data_dir=None, lite: bool = True, save_dtype="source"):
    """Prune the safetensors model in `model_dir` into `out_dir` holding one decoder block at a time.

    Same result as `prune(load(model_dir)); save_pretrained(...)` with the same config and calibration (same
    logits and manifest), but peak memory is the embeddings + head + one block + activations. Progress is
    checkpointed after every block (next to `out_dir`); `resume=True` continues a killed run. `lite=False`
    uses transformers' model classes even where comprune's plain-PyTorch ones (same results, less memory)
    apply. `dtype` "auto" chooses the compute precision as comprune.load does; weights are written in
    `save_dtype` (io.save_dtype: by default the source's). Returns the PruneReport (also written as pruning.json)."""
    t0 = time.perf_counter()
    model_dir, out_dir = resolve_stream_source(model_dir), Path(out_dir)
    cfg = (config or PruneConfig()).validate()
    check_streamable(cfg.method)
    check_target(out_dir, force)
    cfg = cfg.replace(device=pick_device(cfg.device))
    source_config = read_config(model_dir)
    dtype, choice = resolve_precision(dtype, resolve_device(cfg.device), source_config)
    shards = ShardIndex(model_dir)
    lean_allocator()
    partial, ckpt_dir = partial_dir(out_dir), checkpoint_dir(out_dir)
    if resume and (any(partial.glob("model-block-*.safetensors")) or (partial / "model-rest.safetensors").exists()):
        # killed while writing the output: its staged blocks were already moved into output files, so the
        # walk cannot continue from them; start over (same result, the checkpoint only saves time)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        resume = False
    if not resume:
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    own_tokenizer = tokenizer is None
    calibration, tokenizer_saved = _calibrate(model_dir, cfg, calibration, tokenizer, data_dir, partial, resume,
                                              trust_remote_code)
    # The tokenizer (~40 MB with its vocabulary) is not needed during the walk: loaded again to save it.
    tokenizer = None if own_tokenizer else tokenizer

    model = build_skeleton(model_dir, dtype, trust_remote_code, seqlen=calibration.seqlen, lite=lite)
    adapter = get_adapter(model)
    model.comprune_precision = {**choice.to_dict(), "source_dtype": source_dtype(str(model_dir), source_config, dtype)}
    out_dtype = resolve_save_dtype(model, save_dtype)  # the skeleton's (meta) parameters carry the compute dtype
    run = StreamRun(shards, dtype, partial)
    if adapter.moe:  # one module per expert, as the checkpoint stores them (the walk keeps them so)
        adapter.prepare(model)
        run.disk_name = adapter.disk_name
    run.stats["modules"] = "comprune-lite" if isinstance(model, lite_models.CausalLM) else "transformers"
    head = model.get_output_embeddings()
    tied = {module_prefix(model, head) + "weight"} \
        if head is not None and getattr(model.config, "tie_word_embeddings", False) else set()
    check_tensors_match({run.disk_name(k): tuple(v.shape) for k, v in model.state_dict().items()}, shards.shapes,
                        model_dir, optional=tied)
    layers_prefix = load_resident_tensors(model, adapter, shards, dtype, run)
    layers = attach_block_streams(model, adapter, run, finished_blocks(ckpt_dir) if resume else 0)
    _check_fits(model, layers, calibration, cfg, dtype)

    release_memory()  # the calibration text's tokenisation is the largest transient so far
    run.stats["peak_rss_mb_setup"] = peak_rss_mb()  # imports, tokenizer, calibration, embeddings + head
    model, report = _walk(model, tokenizer, cfg, calibration, progress, base_model or str(model_dir), ckpt_dir,
                          resume, out_dir, run, _source_digest(model_dir, shards))
    run.stats["peak_rss_mb_walk"] = peak_rss_mb()
    if adapter.moe:
        adapter.prepare(model)  # prune() stacked the (meta) experts again; the staged blocks hold them split
    run.stats["transformers_modeling_imported"] = "transformers.modeling_utils" in sys.modules

    # ---- write the output into the partial directory, then publish it atomically
    total_size = _write_weights(model, adapter, run, len(layers), layers_prefix, report.params_after, cfg.method,
                                out_dtype)
    _write_config(model, out_dtype, partial)
    report.precision["saved_dtype"] = dtype_name(out_dtype)
    if own_tokenizer and not tokenizer_saved:
        tokenizer = load_tokenizer(model_dir, required=False, trust_remote_code=trust_remote_code)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    add_auto_map(partial, model)
    report.seconds = time.perf_counter() - t0
    report.peak_rss_mb = peak_rss_mb()
    write_card(partial, _write_manifest(model, report, run, total_size), Path(out_dir).name)
    model.comprune_report = report
    publish(partial, out_dir)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return report


def _source_digest(model_dir: Path, shards: ShardIndex) -> str:
    """The identity of the streamed source for resume fingerprints: its resolved path and weight files."""
    return f"{Path(model_dir).resolve()}|{weights_digest_sample(set(shards.files.values()))}"


def _calibrate(model_dir: Path, cfg, calibration, tokenizer, data_dir, partial: Path, resume: bool,
               trust_remote_code: bool = False):
    """(calibration, whether the tokenizer is already saved in `partial`)."""
    if calibration is not None:
        return calibration, False
    if uses_self(cfg.calib):
        raise CompruneError(f"--calib {cfg.calib}: the dense model writes that text, and a streamed prune never holds "
                            "the whole model: prune without --stream")
    if tokenizer is not None:
        return get_calibration(tokenizer, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed, data_dir=data_dir), False
    # the child also writes the tokenizer into the output: loading it costs ~60 MB of heap (more than the
    # walk's own work on a small model) that this process never has to hold
    try:
        return calibration_in_child(model_dir, cfg, data_dir, tokenizer_out=partial,
                                    trust_remote_code=trust_remote_code), True
    except CompruneError:
        if not resume:
            shutil.rmtree(partial, ignore_errors=True)
        raise


def _check_fits(model, layers, calibration, cfg, dtype):
    """On a GPU: one block and its activations must fit (CompruneError naming the fix otherwise)."""
    block_bytes = max(sum(t.numel() * t.element_size() for t in layer.state_dict().values()) for layer in layers)
    act_bytes = calibration.input_ids.numel() * model.config.hidden_size * torch.finfo(dtype).bits // 8
    check_device_memory(resolve_device(cfg.device), block_bytes, act_bytes)


def _walk(model, tokenizer, cfg, calibration, progress, base_model, ckpt_dir: Path, resume: bool, out_dir: Path,
          run: StreamRun, model_digest: str | None = None):
    """The usual prune() on the skeleton, holding blocks by the run (read from disk while resident). On the CPU,
    activation buffers go to files beside the output: RAM then holds one batch, not N x T x d."""
    store = ActivationStore(spill_dir(out_dir) if resolve_device(cfg.device).type == "cpu" else None)
    try:
        with store:
            return prune(model, tokenizer, cfg, calibration=calibration, progress=progress, base_model=base_model,
                         checkpoint_dir=ckpt_dir, resume=resume, model_digest=model_digest, residency=run,
                         store=store)
    except NotImplementedError as e:
        if "meta" in str(e):
            raise CompruneError(f"{cfg.method} reads block weights outside the one-block walk, so it cannot stream: "
                                f"drop --stream or use one of {_streamers()}") from None
        raise


def _write_weights(model, adapter, run: StreamRun, n_layers: int, layers_prefix: str, params_after: int,
                   method: str, dtype: torch.dtype) -> int:
    """The kept blocks renumbered (one file each), the tensors outside the blocks, the index, in `dtype`.
    Returns the bytes."""
    partial, shards = run.partial, run.shards
    weight_map: dict[str, str] = {}
    total_size = 0
    kept_layers = adapter.layers(model)
    kept_index = {run.streams[layer].index for layer in kept_layers}
    for new_idx, layer in enumerate(kept_layers):
        fname = f"model-block-{new_idx:05d}.safetensors"
        for k in _write_block(model, layer, run.streams.pop(layer), partial / fname, shards, dtype, method):
            weight_map[k] = fname
        total_size += (partial / fname).stat().st_size
    for i in range(n_layers):
        if i not in kept_index:
            (partial / STAGED.format(i)).unlink(missing_ok=True)
    rest = {k: _as_source(shards, k, v, dtype) if torch.is_tensor(v) else v
            for k, v in non_block_state(model, layers_prefix, shards, dtype).items()}
    save_tensors(rest, partial / "model-rest.safetensors")
    for k in rest:
        weight_map[k] = "model-rest.safetensors"
    total_size += sum(v.nbytes() if isinstance(v, SourceTensor) else v.numel() * v.element_size()
                      for v in rest.values())
    index = {"metadata": {"total_size": total_size, "total_parameters": params_after},
             "weight_map": dict(sorted(weight_map.items()))}
    (partial / INDEX).write_text(json_text(index, indent=2) + "\n")
    return total_size


def _write_block(model, layer, stream: BlockStream, path: Path, shards: ShardIndex, dtype, method: str) -> list[str]:
    """One kept block under its new name: its staged file renamed in place, or copied from the source shards.
    Returns the tensor names written."""
    new_prefix, disk = module_prefix(model, layer), stream.run.disk_name
    want = {disk(new_prefix + k): tuple(v.shape) for k, v in layer.state_dict().items()}
    if stream.staged is not None and _staged_dtype(stream.staged) != dtype:  # computed in another precision
        tensors = {disk(new_prefix + k.removeprefix(stream.prefix)): _as_source(shards, disk(k), v, dtype)
                   for k, v in read_tensors(stream.staged).items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        save_tensors(tensors, path)
        stream.staged.unlink()
        stream.staged = None
        del tensors
    elif stream.staged is not None:
        header = rename_tensors(stream.staged, path, lambda k: disk(new_prefix + k.removeprefix(stream.prefix)))
        stream.staged = None
        got = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    else:
        with torch.inference_mode(False):
            src = shards.read([disk(stream.prefix + k) for k in layer.state_dict()], dtype)
        tensors = {disk(new_prefix + k): src[disk(stream.prefix + k)] for k in layer.state_dict()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        save_tensors(tensors, path)
        del src, tensors
    if got != want:
        raise CompruneError(f"block {stream.index}: the written tensors do not match the pruned model "
                            f"({method} changed the block outside the walk's hold, so it cannot stream)")
    return list(want)


def _as_source(shards: ShardIndex, name: str, value: torch.Tensor, dtype) -> torch.Tensor:
    """`value` in `dtype`; a tensor the prune left as it was (equal to the source's in the computed precision) is
    written as the source holds it, not widened from its rounded copy, as the in-memory save does."""
    if not value.is_floating_point():
        return value
    if name in shards.files and shards.shapes.get(name) == tuple(value.shape):
        src = read_tensors(shards.files[name], [name])[name]
        if src.dtype == dtype and torch.equal(src.to(value.dtype), value):
            return src
    return value.to(dtype)


def _staged_dtype(path: Path):
    """The floating-point dtype of a staged block file, from its header (None when it has no float tensor)."""
    header, _ = read_header_and_base(path)
    names = {v["dtype"] for k, v in header.items() if k != "__metadata__"} & set(FLOAT_NAMES)
    return FLOAT_NAMES[names.pop()] if len(names) == 1 else None


def _write_config(model, dtype, partial: Path):
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [architecture(model)]
    model.config.save_pretrained(partial)
    if model.can_generate():
        model.generation_config.save_pretrained(partial)


def _write_manifest(model, report, run: StreamRun, total_size: int):
    manifest = report.to_dict()
    manifest["base_model_type"] = base_model_type(model.config)
    manifest["streaming"] = {**run.stats, "source_bytes": sum(f.stat().st_size for f in set(run.shards.files.values())),
                             "output_bytes": total_size}
    write_manifest(run.partial / MANIFEST, manifest)
    return manifest
