"""Named text sources, data-directory resolution and the calibration sampler.

Data directory resolution: explicit argument -> $COMPRUNE_DATA -> ../shared/data beside the repo
(or beside the current directory) -> the Hugging Face hub through `datasets` when online.
"""
from __future__ import annotations

import bz2
import gzip
import bisect
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import deferred
from .errors import CompruneError
from .selfcal import SELF, self_windows

_REPO_ROOT = Path(__file__).resolve().parents[2]

# name -> (relative path under the data dir, json field, hub fallback (path, name, split, field))
SOURCES = {
    "wikitext2": ("wikitext2/hf/test.jsonl", "text", ("wikitext", "wikitext-2-raw-v1", "test", "text")),
    "wikitext2-test": ("wikitext2/hf/test.jsonl", "text", ("wikitext", "wikitext-2-raw-v1", "test", "text")),
    "wikitext2-validation": ("wikitext2/hf/validation.jsonl", "text",
                             ("wikitext", "wikitext-2-raw-v1", "validation", "text")),
    "c4": ("c4/c4-sample.00000-of-00001.json.gz", "text",
           ("allenai/c4", "en", "validation", "text")),
    "c4-validation": ("c4/c4-sample.00000-of-00001.json.gz", "text",
                      ("allenai/c4", "en", "validation", "text")),
}
# The C4 sample is split by document: calibration windows come from the first 90 %, and the last 10 % (~50 k
# tokens) is held out to choose defaults on text the calibration never saw.
C4_HELDOUT = 0.1
ROW_SLICES = {"c4": lambda n: slice(0, n - int(n * C4_HELDOUT)),
              "c4-validation": lambda n: slice(n - int(n * C4_HELDOUT), n)}
# Rows are joined with this separator before tokenising once (the LLM-Pruner/FLAP/SparseGPT protocol).
JOIN = "\n\n"


def candidate_data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    dirs = []
    if os.environ.get("COMPRUNE_DATA"):
        env = Path(os.environ["COMPRUNE_DATA"])
        if not env.is_dir():  # set but wrong: never fall back silently to another directory
            raise CompruneError(f"COMPRUNE_DATA={env} is not a directory: point it at shared/data or unset it")
        return [env]
    dirs += [_REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
             Path.cwd() / "shared" / "data"]
    return dirs


def resolve_data_dir(data_dir: str | os.PathLike | None = None, required: bool = True) -> Path | None:
    """The first existing data directory, or None (hub fallback) when not required."""
    for d in candidate_data_dirs(data_dir):
        if d.is_dir():
            return d
    if data_dir is not None:
        raise CompruneError(f"data directory {data_dir} not found: pass an existing --data-dir or set COMPRUNE_DATA")
    if required:
        raise CompruneError("no data directory found: set COMPRUNE_DATA or pass --data-dir pointing at shared/data")
    return None


def _read_rows(path: Path, field: str) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else bz2.open if path.suffix == ".bz2" else open
    name = path.name.removesuffix(".gz").removesuffix(".bz2")
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if name.endswith(".jsonl") or name.endswith(".json"):
                rows = []
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        raise CompruneError(f"{path}: line {i + 1} is not JSON: fix or replace the file") from None
                    if not isinstance(obj, dict) or field not in obj:
                        raise CompruneError(f"{path}: line {i + 1} is not a JSON object with a '{field}' field: use "
                                            f"JSON lines like {{\"{field}\": \"...\"}}")
                    if not isinstance(obj[field], str):
                        raise CompruneError(f"{path}: line {i + 1} has a {type(obj[field]).__name__} as '{field}', "
                                            "not a string: fix or replace the file")
                    rows.append(obj[field])
                return rows
            return [f.read()]
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise CompruneError(f"cannot read {path} ({e.__class__.__name__}: {e}): check the file is complete") from None


def _hub_rows(spec) -> list[str]:
    path, name, split, field = spec
    try:
        datasets = deferred.datasets()  # optional: only used when online without a local copy
    except ImportError:
        raise CompruneError("no local data and the `datasets` package is missing: set COMPRUNE_DATA "
                            "to shared/data or `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure is the same problem for the user
        raise CompruneError(f"could not load {path}/{name} from the hub ({e.__class__.__name__}): "
                            "set COMPRUNE_DATA to a local data directory") from None
    return list(ds[field])


def _local_file(source: str) -> Path | None:
    """The local .txt / .jsonl(.gz) file `source` names, or None for a known dataset name; anything else is
    refused in one line."""
    p = Path(source)
    if p.suffix in (".txt", ".jsonl", ".json", ".gz", ".bz2") or p.exists():
        if p.is_dir():
            raise CompruneError(f"{source} is a directory: pass a .txt or .jsonl file (or a dataset name such as c4)")
        if not p.is_file():
            raise CompruneError(f"data file {source} not found: check the path")
        return p
    if source not in SOURCES:
        raise CompruneError(f"unknown dataset '{source}': use one of {', '.join(SOURCES)} or a .txt/.jsonl path")
    return None


def load_rows(source: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Rows of a named source, or of a local .txt / .jsonl(.gz) file (field `text`)."""
    p = _local_file(source)
    if p is not None:
        return _read_rows(p, "text")
    rel, field, hub = SOURCES[source]
    root = resolve_data_dir(data_dir, required=data_dir is not None)
    if root is not None and (root / rel).is_file():
        rows = _read_rows(root / rel, field)
    elif root is not None and data_dir is not None:
        raise CompruneError(f"{root / rel} not found: the data directory lacks '{source}'")
    else:
        rows = _hub_rows(hub)
    return rows[ROW_SLICES[source](len(rows))] if source in ROW_SLICES else rows


def load_text(source: str, data_dir=None) -> str:
    return JOIN.join(load_rows(source, data_dir))


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """Tokenise once, as the field's protocol does (no special tokens inserted between rows)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    return ids


def _safe_cut(prev: str, row: str) -> bool:
    """A cut between two rows leaves the tokenisation of their join unchanged: pre-tokenisers split at every
    change between a non-space and a space character, so cutting right after a row that ends in a non-space
    character, before a separator followed by a non-space character, cuts at a word boundary."""
    return bool(prev) and bool(row) and not prev[-1].isspace() and not row[0].isspace()


def tokenize_rows(tokenizer, rows: list[str], chunk_chars: int = 1 << 18) -> torch.Tensor:
    """Token ids of JOIN.join(rows), identical to tokenize_stream of that text, computed in pieces of about
    `chunk_chars` characters cut only where the join cannot change (see _safe_cut). The fast tokenizers'
    per-token bookkeeping costs ~50x the text's size, so tokenising a corpus at once would cost hundreds of MB
    for a moment: more than a streamed prune of a small model needs in total."""
    pieces, start, size = [], 0, 0
    for i, row in enumerate(rows):
        if i > start and size >= chunk_chars and _safe_cut(rows[i - 1], row):
            pieces.append(_piece(tokenizer, rows, start, i))
            start, size = i, 0
        size += len(row) + len(JOIN)
    if rows:
        pieces.append(_piece(tokenizer, rows, start, len(rows)))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def _piece(tokenizer, rows, start, end) -> torch.Tensor:
    text = (JOIN if start else "") + JOIN.join(rows[start:end])
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False).input_ids, dtype=torch.long)


def load_ids(tokenizer, source: str, data_dir=None) -> torch.Tensor:
    """The token stream of a named source or text file (rows joined with JOIN), tokenised in bounded pieces."""
    return tokenize_rows(tokenizer, load_rows(source, data_dir))


@dataclass
class Calibration:
    """N windows of T tokens plus where they came from (recorded in pruning.json)."""
    input_ids: torch.Tensor  # [N, T] long
    source: str
    seed: int
    # where the source was read (the search's held-out windows come from the same text)
    data_dir: str | None = field(default=None, compare=False)
    # the width search's fitness windows, when whoever tokenised the source also drew them (a streamed prune's
    # child process: the walk itself holds no tokenizer)
    heldout: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # how a mix was made (its parts' window counts) and, for `self`, the generator's settings and token digests
    record: dict | None = field(default=None, repr=False, compare=False)

    @property
    def nsamples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]

    def sha256(self) -> str:
        return hashlib.sha256(self.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen,
                "seed": self.seed, "sha256": self.sha256(), **(self.record or {})}


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """N random windows of T tokens from a token stream; seeded with its own RNG so global state is untouched."""
    if seqlen <= 1:
        raise CompruneError(f"seqlen must be > 1 (got {seqlen})")
    if nsamples < 1:
        raise CompruneError(f"nsamples must be >= 1 (got {nsamples})")
    if ids.numel() <= seqlen:
        raise CompruneError(f"calibration text has {ids.numel()} tokens, fewer than seqlen {seqlen}+1: "
                            "use a longer text or a smaller --seqlen")
    starts = window_starts(ids.numel(), nsamples, seqlen, seed)
    return torch.stack([ids[s:s + seqlen] for s in starts])


def window_starts(n_tokens: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, n_tokens - seqlen) for _ in range(nsamples)]


def heldout_windows(tokenizer, calibration: "Calibration", nsamples: int, seqlen: int, data_dir=None):
    """Windows of the calibration's own source that overlap none of its windows (the search's fitness tokens),
    or None when the calibration did not come from get_calibration on that source."""
    try:
        ids = load_ids(tokenizer, calibration.source, data_dir)
    except CompruneError:
        return None
    calib_starts = window_starts(ids.numel(), calibration.nsamples, calibration.seqlen, calibration.seed)
    rebuilt = torch.stack([ids[s:s + calibration.seqlen] for s in calib_starts])
    if not torch.equal(rebuilt, calibration.input_ids.to(rebuilt.dtype)):
        return None
    return _windows_apart(ids, calib_starts, calibration, nsamples, seqlen)


def _windows_apart(ids: torch.Tensor, calib_starts: list[int], calibration: "Calibration", nsamples: int,
                   seqlen: int) -> torch.Tensor:
    taken = sorted(calib_starts)
    room = _room_apart(ids.numel(), taken, calibration.seqlen, seqlen)
    if room < nsamples:  # refused before drawing: the draws below cannot place more than fit
        raise CompruneError(f"the calibration text is too short for {nsamples} search windows apart from the "
                            f"calibration windows ({ids.numel()} tokens leave room for at most {room} of {seqlen} "
                            "tokens): lower --search-nsamples or use a longer --calib text")
    rng = random.Random(f"heldout:{calibration.seed}")
    starts: list[int] = []
    placed: list[int] = []  # starts, sorted: a draw is checked against its two neighbours only
    for _ in range(100 * nsamples):
        if len(starts) == nsamples:
            break
        s = rng.randrange(0, ids.numel() - seqlen)
        j = bisect.bisect_left(taken, s)
        near = taken[max(j - 1, 0): j + 1]
        k = bisect.bisect_left(placed, s)
        if all(s + seqlen <= t or t + calibration.seqlen <= s for t in near) and \
                all(s + seqlen <= t or t + seqlen <= s for t in placed[max(k - 1, 0): k + 1]):
            starts.append(s)
            placed.insert(k, s)
    if len(starts) < nsamples:
        raise CompruneError(f"the calibration text is too short for {nsamples} search windows apart from the "
                            f"calibration windows (random draws placed {len(starts)} of at most {room}): lower "
                            "--search-nsamples or use a longer --calib text")
    return torch.stack([ids[s:s + seqlen] for s in starts])


def _room_apart(n_tokens: int, taken: list[int], taken_len: int, seqlen: int) -> int:
    """How many windows of `seqlen` fit, apart from each other, in the tokens that the windows at the sorted
    starts `taken` (each `taken_len` long) leave free; a window starts before n_tokens - seqlen (randrange)."""
    room, free = 0, 0
    for t in taken:
        room += max(t - free, 0) // seqlen
        free = max(free, t + taken_len)
    return room + max(n_tokens - 1 - free, 0) // seqlen


def parse_mix(source: str) -> list[tuple[str, float]]:
    """`--calib` as (source, weight) parts: `c4`, `self`, or a mix such as `self:0.5,c4:0.5` (weights are shares of
    the windows, normalised to sum to 1)."""
    parts = []
    for part in source.split(",") if "," in source or ":" in source else [source]:
        name, _, weight = part.rpartition(":")
        try:
            w = float(weight)
        except ValueError:
            if "," in source:
                raise CompruneError(f"--calib {source}: '{part}' is not SOURCE:WEIGHT: write a mix as e.g. "
                                    "self:0.5,c4:0.5") from None
            return [(source, 1.0)]  # a path with a colon in it, not a mix
        if not name or not w > 0 or w != w or w == float("inf"):
            raise CompruneError(f"--calib {source}: '{part}' needs a source and a positive weight, e.g. self:0.5,c4:0.5")
        parts.append((name, w))
    names = [n for n, _ in parts]
    if len(set(names)) != len(names):
        raise CompruneError(f"--calib {source} names a source twice: give each source once with its share")
    total = sum(w for _, w in parts)
    return [(n, w / total) for n, w in parts]


def check_source(source: str) -> None:
    """Refuse, in one line and before anything is read, a source or mix naming an unknown dataset or a missing
    file."""
    for name, _ in parse_mix(source):
        if name != SELF:
            _local_file(name)


def uses_self(source: str) -> bool:
    """Whether `--calib source` needs the dense model to write text (`self`, alone or in a mix)."""
    return any(name == SELF for name, _ in parse_mix(source))


def mix_counts(total: int, weights: list[float]) -> list[int]:
    """`total` windows shared by weight, largest remainders first (ties to the earlier part): they sum to `total`."""
    exact = [total * w for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))[:total - sum(counts)]:
        counts[i] += 1
    return counts


def get_calibration(tokenizer, source: str = "c4", nsamples: int = 128, seqlen: int = 128, seed: int = 0,
                    data_dir=None, heldout: int = 0, model=None, progress: bool = True) -> Calibration:
    """N windows of T tokens of `source`; with `heldout`, also that many windows apart from them
    (Calibration.heldout, the width search's fitness windows), from the same tokenisation. `source` may be `self`
    (text the dense `model` writes: comprune.selfcal) or a mix such as `self:0.5,c4:0.5` (each part's share of the
    windows, drawn as that source alone would draw them, the parts in the order written)."""
    parts = parse_mix(source)
    if len(parts) == 1 and parts[0][0] != SELF:
        return _source_calibration(tokenizer, parts[0][0], nsamples, seqlen, seed, data_dir, heldout)
    if nsamples < 1:
        raise CompruneError(f"nsamples must be >= 1 (got {nsamples})")
    counts = mix_counts(nsamples, [w for _, w in parts])
    held_counts = mix_counts(heldout, [w for _, w in parts])
    windows, held, record = [], [], {"parts": []}
    for (name, _), n, k in zip(parts, counts, held_counts):
        if n == 0 and k == 0:
            continue
        if name == SELF:
            w, h, record["self"] = self_windows(model, tokenizer, n, seqlen, seed, heldout=k, progress=progress)
        else:
            c = _source_calibration(tokenizer, name, max(n, 1), seqlen, seed, data_dir, k)
            w, h = c.input_ids[:n], c.heldout
        windows.append(w)
        if h is not None:
            held.append(h)
        record["parts"].append({"source": name, "windows": n, "heldout_windows": k})
    return Calibration(torch.cat(windows), source, seed, data_dir=None if data_dir is None else str(data_dir),
                       heldout=torch.cat(held) if heldout else None, record=record)


def _source_calibration(tokenizer, source, nsamples, seqlen, seed, data_dir, heldout) -> Calibration:
    ids = load_ids(tokenizer, source, data_dir)
    calib = Calibration(sample_windows(ids, nsamples, seqlen, seed), source, seed,
                        data_dir=None if data_dir is None else str(data_dir))
    if heldout:
        calib.heldout = _windows_apart(ids, window_starts(ids.numel(), nsamples, seqlen, seed), calib, heldout, seqlen)
    return calib
