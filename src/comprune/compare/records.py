"""The files a comparison keeps: one JSON record per run (method x ratio, or dense), written atomically."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..outputs import json_text

DEFAULT_METHODS = ("comp", "llm-pruner", "flap", "layer-drop", "wanda-sp")
DEFAULT_OUT = "benchmarks/results/compare"
STAGES = ("prune", "ppl", "speed", "llamacpp", "stream", "zeroshot", "full", "zeroshot_full")
REDOABLE = ("prune", "speed", "llamacpp", "stream")  # measurements of time and memory; the others are deterministic
# How prune records measured peak memory. Records with another probe (or none: getrusage's ru_maxrss in the
# prune itself, which Linux carries across exec from the launching process) are re-pruned (same model,
# checked) to measure again.
RSS_PROBE = "wait4"
# Streamed prunes recorded before this version ran on transformers' modules (a heavier runtime): measure again.
STREAM_RECORD = 2


def run_name(method: str, ratio: float) -> str:
    return f"{method}-r{ratio:.2f}"


def ppl_key(seqlen: int, full: bool, max_tokens: int) -> str:
    """A perplexity result's key in a run record: the full test set or its first `max_tokens` tokens."""
    return f"wikitext2@{seqlen}" + ("/full" if full else f"/{max_tokens}")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, obj: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json_text(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def log(msg: str, show: bool):
    if show:
        print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
