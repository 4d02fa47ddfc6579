"""The files a comparison keeps: one JSON record per run (method x ratio, or dense), written atomically."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from ..card import perplexity_entry, zeroshot_entry
from ..errors import CompruneError
from ..outputs import json_text

DEFAULT_METHODS = ("comp", "llm-pruner", "flap", "layer-drop", "wanda-sp")
DEFAULT_OUT = "benchmarks/results/compare"
STAGES = ("prune", "ppl", "speed", "llamacpp", "stream", "zeroshot", "full", "zeroshot_full", "chat")
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
    """A record, or {} when there is none or it is not a JSON object (a run killed by a full disk or an edit:
    the run is not done, `set_aside_corrupt` says so once and its stages are redone)."""
    try:
        obj = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def corrupt_reason(path: Path) -> str | None:
    """Why `path` is not a usable record (not JSON, not an object), or None."""
    try:
        obj = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        return f"not valid JSON: {str(e).splitlines()[0][:80]}"
    return None if isinstance(obj, dict) else f"JSON but not an object ({type(obj).__name__})"


def set_aside_corrupt(runs: Path) -> list[Path]:
    """Move every unusable run record in `runs` to NAME.json.corrupt (its bytes kept for the user) with one
    warning line each: its run counts as not done and is redone."""
    moved = []
    for path in sorted(Path(runs).glob("*.json")) if Path(runs).is_dir() else []:
        why = corrupt_reason(path)
        if why is None:
            continue
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        print(f"comprune: warning: {path} is {why}: that run is redone (the file is kept as {aside.name})",
              file=sys.stderr, flush=True)
        moved.append(aside)
    return moved


def check_results_dir(out) -> Path:
    """Refuse a comparison's `--out` that cannot hold results, before any work: a file, a dangling link, a
    location that cannot be created or written (the directory itself and the subdirectories a rerun writes)."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise CompruneError(f"--out {out} is a dangling symbolic link: remove it or choose another --out")
    if out.exists() and not out.is_dir():
        raise CompruneError(f"--out {out} exists and is not a directory: choose another --out (a comparison's "
                            "results directory; an existing one is resumed)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompruneError(f"cannot create --out {out} ({e.strerror or e}): choose a writable location") from None
    for d in [out] + [out / sub for sub in ("runs", "logs", "models") if (out / sub).is_dir()]:
        try:  # for real: root ignores permission bits but not a read-only mount
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=d)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise CompruneError(f"cannot write in {d} ({e.strerror or e}): choose a writable --out") from None
    settings = out / "settings.json"
    if settings.exists() and corrupt_reason(settings):
        raise CompruneError(f"{settings} is {corrupt_reason(settings)}: it says which model and calibration the "
                            "results are of; delete it (the runs are then taken as they are) or choose another --out")
    return out


def write_json(path: Path, obj: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json_text(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def log(msg: str, show: bool):
    if show:
        print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def card_entries(stage: str, rec: dict, dtype) -> list[dict]:
    """A stage's measurements of a run, as pruned models record them (pruning.json `evaluations`, the card)."""
    run = {"by": "comprune compare", "dtype": dtype}
    if stage in ("ppl", "full"):
        return [perplexity_entry(run, r) for r in rec.get("ppl", {}).values()]
    res = rec.get(stage)
    if not isinstance(res, dict):
        return []
    if stage in ("zeroshot", "zeroshot_full"):
        return [zeroshot_entry(run, stage, res, subset=res.get("subset"))]
    results = {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return [{**run, "what": {"speed": "generation speed (transformers)", "llamacpp": "llama.cpp speed"}.get(stage, stage),
             "results": results}] if results else []
