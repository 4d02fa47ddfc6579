"""Checkpoint and resume for the block walk.

After each finished block the walk persists what the rest of the run needs: the method's records so far
(kept neuron indices and exact scales of every pruned block, removed layers, layer scores) and the
activations that feed the next block. Both are written to temporary files and renamed, so a kill at any
point leaves either the previous or the new checkpoint. Resuming re-applies the recorded surgery to the
finished blocks (bit-identical: scales are stored as exact float64 values) and continues from the saved
activations, so the result equals an uninterrupted run with the same seed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import distributed
from .errors import CompruneError
from .outputs import json_text, loads_exact, sibling
from .shards import save_tensors
from .walk import Activations, SpilledBatches, batch_shape

STATE = "state.json"
OWNER = "run.json"                 # the run's fingerprint, written before anything else: a plan's own state
                                   # (the width search's database and evolution) is resumed only by its run
ACTS = "acts.safetensors"          # (older checkpoints)
ACTS_BLOCK = "acts-{:05d}.safetensors"  # the inputs of block N, referenced from state.json
RANK_ACTS = "rank{}-acts-{:05d}.safetensors"  # another rank's share of them (comprune.distributed)


def checkpoint_dir(out_dir: Path) -> Path:
    """Where a prune into `out_dir` keeps its resume state (beside the output, removed when it is published)."""
    return sibling(out_dir, "checkpoint")


def resumed_precision(ckpt_dir: Path) -> dict | None:
    """How the interrupted run in `ckpt_dir` chose its precision (precision.Choice's fields), if it recorded it."""
    try:
        rec = json.loads((Path(ckpt_dir) / OWNER).read_text()).get("precision")
    except (OSError, ValueError, AttributeError):
        return None
    return rec if isinstance(rec, dict) and rec.get("dtype") in ("float32", "float16", "bfloat16") else None


def run_fingerprint(cfg_dict: dict, calib_sha: str, params_before: int, model_digest: str = "") -> str:
    """Identity of a run: config, calibration windows, parameter count and the model's weights (a digest)."""
    keep = {k: v for k, v in cfg_dict.items() if k not in ("device",)}
    blob = json.dumps([keep, calib_sha, params_before, model_digest], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Batch:
    """One activation batch for shards.save_tensors, read (from memory or its spill file) only when written."""

    def __init__(self, hidden, i: int):
        self.hidden, self.i = hidden, i
        self.shape = list(batch_shape(hidden, i))
        self.dtype = hidden.dtype(i) if isinstance(hidden, SpilledBatches) else hidden[i].dtype

    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def write_to(self, f):
        t = self.hidden[self.i].detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            f.write(memoryview(t.view(torch.uint8).numpy()))


def _kill_hook(next_block: int):
    """Test hook: die by a signal right after this checkpoint (the resume tests), on one rank with
    COMPRUNE_KILL_RANK."""
    if os.environ.get("COMPRUNE_KILL_AFTER_BLOCK") == str(next_block) and \
            os.environ.get("COMPRUNE_KILL_RANK", str(distributed.rank())) == str(distributed.rank()):
        os.kill(os.getpid(), signal.SIGKILL)


class Checkpoint:
    def __init__(self, directory, fingerprint: str):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)

    def _atomic_json(self, name: str, obj):
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json_text(obj, exact=True))  # a resumed run needs back every value, inf and nan too
        os.replace(tmp, self.dir / name)

    def save(self, next_block: int, acts: Activations | None, details: dict):
        """Persist progress: `next_block` is the first block not yet done. One rename commits it: the activations
        go to a file named by the block they feed, referenced from state.json, which is replaced last; a kill
        before that leaves the previous state with its own (still present) activations file."""
        acts_name = None
        if acts is not None:
            # tensor by tensor: no serialized copy of the activations in memory
            acts_name = ACTS_BLOCK.format(next_block)
            own = acts_name if distributed.is_writer() else RANK_ACTS.format(distributed.rank(), next_block)
            save_tensors({f"h{i}": _Batch(acts.hidden, i) for i in range(len(acts.hidden))}, self.dir / own)
        if distributed.active():
            # In a group every rank keeps its own activations and rank 0 commits once all of them are on disk; a
            # rank's older file goes only after a later commit, so a kill anywhere leaves a complete checkpoint.
            if not distributed.is_writer():
                _kill_hook(next_block)
            distributed.barrier()
            if not distributed.is_writer():
                return
        state = {"fingerprint": self.fingerprint, "next_block": next_block, "acts": acts_name,
                 "details": {**details, "blocks": {str(k): v for k, v in details.get("blocks", {}).items()}}}
        self._atomic_json(STATE, state)
        for old in self.dir.glob("acts*.safetensors"):  # superseded by the state just committed
            if old.name != acts_name:
                old.unlink(missing_ok=True)
        for old in self.dir.glob("rank*-acts-*.safetensors"):  # the other ranks' shares of earlier blocks
            if int(old.name.split("-")[-1].split(".")[0]) < next_block:
                old.unlink(missing_ok=True)
        _kill_hook(next_block)

    def claim(self, precision: dict | None = None):
        """Mark the directory as this run's before any state is written, with how its precision was chosen (a
        resume under --dtype auto computes in it again: the probe that chose it may choose otherwise under load)."""
        if distributed.is_writer():
            self._atomic_json(OWNER, {"fingerprint": self.fingerprint, "precision": precision})
        distributed.barrier()  # the other ranks write their activations into the directory claimed

    def verify(self):
        """Refuse to resume another run's work: its fingerprint (config, calibration, model weights) must match,
        and a directory holding state without an owner cannot be told apart from another run's."""
        path = self.dir / OWNER
        if path.is_file():
            try:
                owner = json.loads(path.read_text()).get("fingerprint")
            except (ValueError, AttributeError):
                owner = None
            if owner == self.fingerprint:
                return
        elif not any(not p.name.startswith(".") for p in self.dir.iterdir()):
            return  # nothing to resume (at most a temporary file a kill left): the run starts from scratch
        err = CompruneError(f"the checkpoint in {self.dir} belongs to a different run (config, calibration or "
                            "model differ): rerun with the same model and arguments, or with --force to start over")
        err.keep_resumable = True  # the user's checkpoint stays for the right command
        raise err

    def load(self, template: Activations) -> tuple[int, Activations, dict] | None:
        """(next_block, activations, details) or None when there is nothing to resume."""
        path = self.dir / STATE
        if not path.is_file():
            return None
        state = loads_exact(path.read_text())
        if state.get("fingerprint") != self.fingerprint:
            err = CompruneError(f"the checkpoint in {self.dir} belongs to a different run (config, calibration or "
                                "model differ): rerun with the same model and arguments, or with --force to start over")
            err.keep_resumable = True  # the user's checkpoint stays for the right command
            raise err
        details = state["details"]
        details["blocks"] = {int(k): v for k, v in details["blocks"].items()}
        acts_name = state.get("acts")
        if not acts_name:  # only the layer stage had finished: start from block 0's inputs
            return state["next_block"], template, details
        if not distributed.is_writer():
            acts_name = RANK_ACTS.format(distributed.rank(), state["next_block"])
        if not (self.dir / acts_name).is_file():
            raise CompruneError(f"the checkpoint in {self.dir} lacks its activations ({acts_name}): rerun with "
                                "--force instead of --resume to start over")
        device = template.hidden[0].device
        hidden = template.store.new()  # one batch at a time: into files when the walk spills activations
        with safe_open(str(self.dir / acts_name), "pt") as f:
            for i in range(len(template.hidden)):
                hidden.append(f.get_tensor(f"h{i}").to(device))
        return state["next_block"], template.like(hidden), details

    def save_block_tensors(self, block: int, tensors: dict):
        """Weights a record alone cannot rebuild (e.g. least-squares refitted down_proj), one file per block."""
        if not distributed.is_writer():
            return
        tmp = self.dir / f".block{block}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.dir / f"block{block}.safetensors")

    def load_block_tensors(self, block: int) -> dict | None:
        path = self.dir / f"block{block}.safetensors"
        return load_file(str(path)) if path.is_file() else None

    def clear(self):
        if not distributed.is_writer():
            return
        for name in (STATE, ACTS, OWNER):
            (self.dir / name).unlink(missing_ok=True)
        for path in self.dir.glob("acts-*.safetensors"):
            path.unlink()
        for path in self.dir.glob("rank*-acts-*.safetensors"):
            path.unlink()
        for path in self.dir.glob("block*.safetensors"):
            path.unlink()
        # the width search's state and database (methods.search): another run must not resume them
        (self.dir / "search.json").unlink(missing_ok=True)
        shutil.rmtree(self.dir / "search-db", ignore_errors=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass
