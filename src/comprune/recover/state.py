"""What a recovery stage keeps between a kill and its resume (its trainable tensors, the optimiser's state and its
progress, committed by one rename), and the record it leaves in pruning.json."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import distributed
from ..errors import CompruneError
from ..memory import peak_rss_mb


def fingerprint(*parts) -> str:
    """A digest of what must match for a stage to resume: its options, its data, the model it starts from."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict:
    """Adam's per-parameter state as flat tensors (its hyper-parameters come from the options)."""
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict):
    sd = opt.state_dict()
    state = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


class StageCheckpoint:
    """`<name>.json` (progress, the fingerprint) naming `<name>-<step>.safetensors` (tensors): the json is
    replaced last, so a kill leaves the previous step's pair whole. In a process group rank 0 alone writes and
    reads it; the other ranks take what it read."""

    def __init__(self, directory, name: str, fp: str):
        self.dir = Path(directory) if directory is not None else None
        self.name, self.fp = name, fp

    def clear(self):
        if self.dir is None or not distributed.is_writer() or not self.dir.is_dir():
            return
        (self.dir / f"{self.name}.json").unlink(missing_ok=True)
        for p in self.dir.glob(f"{self.name}-*.safetensors"):
            p.unlink()

    def load(self) -> tuple[dict, dict] | None:
        """(progress, tensors) of the last committed step, or None when there is none (rank 0's, on every rank)."""
        got = None
        if distributed.is_writer():
            try:
                got = self._load()
            except CompruneError as e:
                got = e
        got = distributed.decided(got)
        if isinstance(got, CompruneError):
            raise got
        return got

    def _load(self):
        if self.dir is None or not (self.dir / f"{self.name}.json").is_file():
            return None
        state = json.loads((self.dir / f"{self.name}.json").read_text())
        if state.get("fingerprint") != self.fp:
            raise CompruneError(f"the {self.name} checkpoint in {self.dir} belongs to a different run (options, data "
                                "or pruned model differ): rerun with the same arguments, or with --force to start over")
        return state["progress"], load_file(str(self.dir / state["tensors"]))

    def save(self, step: int, progress: dict, tensors: dict):
        if self.dir is None or not distributed.is_writer():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{self.name}-{step:06d}.safetensors"
        tmp = self.dir / f".{name}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.dir / name)
        tmp = self.dir / f".{self.name}.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fp, "tensors": name, "progress": progress}))
        os.replace(tmp, self.dir / f"{self.name}.json")
        for old in self.dir.glob(f"{self.name}-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        # Test hook: die by a signal right after this checkpoint (the resume tests)
        if os.environ.get("COMPRUNE_KILL_AFTER_STEP") == f"{self.name}:{step}":
            os.kill(os.getpid(), signal.SIGKILL)


def heldout_step(prog: dict, step: int, kl: float, tensors: dict, best: dict, patience: int, seconds: float) -> dict:
    """Early stopping's bookkeeping after a held-out evaluation: the curve, the best tensors so far (returned), and
    the stop once the KL has not fallen for `patience` evaluations. Rank 0's record and decision stand."""
    prog["curve"].append([step, kl])
    if kl < prog["best"]:
        prog.update(best=kl, best_step=step, bad=0)
        best = {n: t.detach().clone() for n, t in tensors.items()}
    else:
        prog["bad"] += 1
        if prog["bad"] >= patience:
            prog["stopped"] = "held-out KL stopped falling"
    prog["seconds"] = seconds
    prog.update(distributed.decided(prog))  # the ranks hold the same KL; rank 0's record and decision stand
    return best


def peak_memory(device) -> dict:
    rec = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        rec["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return rec


class Clock:
    """Seconds since the stage started, and whether its time budget (0: none) is spent."""

    def __init__(self, budget: float = 0.0, already: float = 0.0):
        self.t0, self.budget, self.already = time.perf_counter(), budget, already

    @property
    def seconds(self) -> float:
        return self.already + time.perf_counter() - self.t0

    def spent(self) -> bool:
        return bool(self.budget) and self.seconds >= self.budget
