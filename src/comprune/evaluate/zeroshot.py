"""Zero-shot accuracy on the seven standard commonsense tasks with the real lm-evaluation-harness, offline.

Offline tasks: each task starts from the harness's own stock YAML (prompts, targets, choices, metrics,
process_docs all unchanged, loaded with lm_eval's own YAML loader) and only its data source is swapped for
the local JSON-lines copy: `dataset_path="json"`, `dataset_kwargs={"data_files": {split: file}}`. The
`json` builder ships inside `datasets`, so nothing is fetched and `HF_DATASETS_OFFLINE=1` is fine.

HellaSwag: only the llama.cpp text extract exists locally (see shared/data/hellaswag/README.md). It is
turned into rows with the stock fields so the stock `process_docs` runs unchanged; the extract lost the
`ctx_a`/`ctx_b` boundary that `ctx_b.capitalize()` needs, which is guessed (see `_hellaswag_rows`), so its
scores are marked `approximate`.

Example selection:
  * `limit=N`  -> the first N examples of each task (the harness's own `limit`).
  * `subset=N` -> N examples per task drawn without replacement as
    `sorted(random.Random(seed).sample(range(n_docs), N))` (seed 1234 by default), passed to the harness as
    `samples`. The draw depends only on the seed and the task's size, so it is the same examples on every run
    and for every model; it is not the first N.
  * `subset=N, heldout=True` -> N other examples per task, none of them in that draw: settings are chosen on
    these, results reported on the subset.

Response cache: pass `cache_key` (a string naming the model, e.g. "smollm2-dense-fp32") to keep every
loglikelihood the model computes in a sqlite db (lm_eval's `use_cache`/CachingLM) under
`<comprune cache>/lm_eval/<cache_key>_rank0.db`. A later call with the same key (e.g. the full set after a
subset, or a re-run after an interruption) only scores requests not seen before. The key must change
whenever the weights change: the harness hashes only the request text, never the model. No key = no cache.
The harness's `cache_requests` (built-request cache) is not used: its key ignores `samples` and the data
files, so it would return the wrong examples for a subset.

Per-example results: `per_example=True` adds to each task `doc_ids` (sorted; "all" for 0..n-1) and `correct`,
a string of "0"/"1" per example in that order for the task's paper metric: what a paired test between two
models needs (evaluate.significance).
"""
from __future__ import annotations

import bz2
import logging
import random
import re
import time
from pathlib import Path

from .. import deferred
from ..data import resolve_data_dir
from ..errors import CompruneError
from ..loading import cache_dir as comprune_cache
from ..outputs import json_text, loads_exact
from . import compiled, packed

PAPER7 = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]

# task -> (stock YAML under lm_eval/tasks, local file under the data dir, split name the stock task evaluates)
TASKS = {
    "boolq": ("super_glue/boolq/default.yaml", "boolq/hf/validation.jsonl", "validation"),
    "piqa": ("piqa/piqa.yaml", "piqa/hf/validation.jsonl", "validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/hellaswag_val_full.txt.bz2", "validation"),
    "winogrande": ("winogrande/default.yaml", "winogrande/hf/validation.jsonl", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "arc/hf/ARC-Easy-test.jsonl", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "arc/hf/ARC-Challenge-test.jsonl", "test"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/hf/test.jsonl", "test"),
}
# The metric each task contributes to the paper average (LLM-Pruner / COMP convention).
PAPER_METRIC = {"boolq": "acc", "piqa": "acc", "winogrande": "acc", "arc_easy": "acc",
                "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
APPROXIMATE = {"hellaswag"}
_HS_FORMAT = 2  # bump when _hellaswag_rows changes, so the cached conversion is rebuilt


def parse_tasks(tasks) -> list[str]:
    """A list or comma string of task names; 'paper7' expands; order kept, duplicates dropped."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks or [])
    out = []
    for name in (n.strip().lower() for n in names):
        if not name:
            continue
        for t in PAPER7 if name == "paper7" else [name]:
            if t not in TASKS:
                raise CompruneError(f"unknown zero-shot task '{t}': use paper7 or any of {', '.join(PAPER7)}")
            if t not in out:
                out.append(t)
    if not out:
        raise CompruneError(f"no zero-shot task given: pass --tasks paper7 or some of {', '.join(PAPER7)}")
    return out


def harness_version() -> str:
    try:
        lm_eval = deferred.lm_eval()
    except ImportError:
        raise CompruneError("zero-shot evaluation needs lm-evaluation-harness: "
                            "pip install 'comprune[eval]' (lm_eval>=0.4.5,<0.5)") from None
    return lm_eval.__version__


def _hellaswag_rows(src: Path) -> list[dict]:
    """Rows in the stock HF schema from the 6-lines-per-item text extract.

    Line 1 is `preprocess(activity_label) + ": " + preprocess(ctx_a + " " + ctx_b)`. The stock query
    capitalises ctx_b; the boundary is lost, so we guess it: a lower-case fragment after the last ". " can
    only be the (uncapitalised) ctx_b, since full sentences start upper-case. That fragment becomes ctx_b,
    the rest ctx_a, and the stock process_docs rebuilds the stock query. Without such a fragment the whole
    context goes to ctx_a (ctx_b="") and the query is the extract's text as is.
    """
    with bz2.open(src, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise CompruneError(f"{src}: {len(lines)} lines is not 6 per item: replace the file with a complete copy")
    rows = []
    for i in range(0, len(lines), 6):
        label, _, ctx = lines[i].partition(": ")
        ctx_a, ctx_b = _split_ctx(ctx)
        rows.append({"ind": i // 6, "activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "label": lines[i + 1].strip(), "endings": lines[i + 2:i + 6], "split": "val"})
    return rows


def _split_ctx(ctx: str) -> tuple[str, str]:
    head, sep, tail = ctx.rpartition(". ")
    if sep and tail[:1].islower():
        return head + ".", tail
    return ctx, ""


def _hellaswag_jsonl(src: Path) -> Path:
    """Convert the text extract once; kept in comprune's cache so the datasets arrow cache is reused."""
    stat = src.stat()
    out = comprune_cache() / "zeroshot" / f"hellaswag_val_v{_HS_FORMAT}_{stat.st_size}_{int(stat.st_mtime)}.jsonl"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in _hellaswag_rows(src):
                f.write(json_text(row, ensure_ascii=False) + "\n")
        tmp.replace(out)  # atomic: a crash never leaves a half-written file under the final name
    return out


def _count_rows(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def task_config(task: str, root: Path) -> tuple[dict, int]:
    """The stock task config with its dataset pointed at the local file, and the number of examples."""
    lm_eval = deferred.lm_eval("tasks", "tasks._yaml_loader")
    stock_rel, data_rel, split = TASKS[task]
    stock = Path(lm_eval.tasks.__file__).parent / stock_rel
    if not stock.is_file():
        raise CompruneError(f"lm_eval {harness_version()} has no {stock_rel}: install lm_eval>=0.4.5,<0.5")
    src = root / data_rel
    if not src.is_file():
        raise CompruneError(f"data file {src} for task {task} not found: set COMPRUNE_DATA / --data-dir "
                            "to a directory holding it (see shared/data)")
    data = _hellaswag_jsonl(src) if task == "hellaswag" else src
    cfg = lm_eval.tasks._yaml_loader.load_yaml(stock, resolve_func=True)  # resolves `include:` and `!function` the harness's way
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: str(data)}},
               training_split=None, validation_split=split if split == "validation" else None,
               test_split=split if split == "test" else None, fewshot_split=None, num_fewshot=0)
    return cfg, _count_rows(data)


def subset_indices(n_docs: int, n: int, seed: int = 1234, heldout: bool = False) -> list[int]:
    """The fixed-seed draw used by `subset` (same for every run and model). `heldout`: as many other examples,
    disjoint from that draw, for choosing settings without touching the examples that are reported."""
    reported = sorted(random.Random(seed).sample(range(n_docs), min(n, n_docs)))
    if not heldout:
        return reported
    taken = set(reported)
    rest = [i for i in range(n_docs) if i not in taken]
    return sorted(random.Random(f"{seed}-heldout").sample(rest, min(n, len(rest))))


def _metrics(task: str, res: dict, n: int) -> dict:
    def get(name):
        v = res.get(f"{name},none")
        return None if v is None or v == "N/A" else float(v)
    return {"acc": get("acc"), "acc_stderr": get("acc_stderr"), "acc_norm": get("acc_norm"),
            "acc_norm_stderr": get("acc_norm_stderr"), "n": n, "approximate": task in APPROXIMATE,
            "metric": PAPER_METRIC[task]}


def _per_example(samples: list[dict], metric: str) -> dict:
    """Each example's 0/1 score on `metric`, in doc_id order, as a compact string."""
    rows = sorted((int(s["doc_id"]), s[metric]) for s in samples)
    ids = [d for d, _ in rows]
    return {"doc_ids": "all" if ids == list(range(len(ids))) else ids,  # a full set: 0..n-1
            "correct": "".join("1" if v >= 0.5 else "0" for _, v in rows)}


def paper_average(task_results: dict) -> float | None:
    vals = [r[r["metric"]] for r in task_results.values() if r.get(r["metric"]) is not None]
    return sum(vals) / len(vals) if vals else None


def average_note(names: list[str]) -> str:
    acc = [t for t in names if PAPER_METRIC[t] == "acc"]
    norm = [t for t in names if PAPER_METRIC[t] == "acc_norm"]
    note = (f"mean over the {len(names)} task(s) present of acc ({', '.join(acc) or '-'}) "
            f"and acc_norm ({', '.join(norm) or '-'})")
    if "hellaswag" in names:
        note += "; hellaswag is approximate (rebuilt from a text extract)"
    return note


def evaluate_zeroshot(model, tokenizer, tasks, limit=None, subset=None, data_dir=None, batch_size=16,
                      progress=True, seed=1234, cache_key=None, cache_dir=None, per_example=False,
                      runner: str = "packed", heldout: bool = False, compile: bool | str = False) -> dict:
    """Zero-shot acc/acc_norm of an in-memory HF causal LM on `tasks` (see the module docstring). runner
    "packed" (default) scores each context's choices in one sequence (evaluate/packed.py: 2.2x faster on SmolLM2's
    HellaSwag, ARC-Easy and PIQA with every example's score identical); "hflm" is lm_eval's own loop. `heldout`
    (with `subset`): the same number of examples, none of them in the reported subset (subset_indices).
    `compile` (packed runner; True, False or "auto": the full sets only): the decoder layers run through
    torch.compile (evaluate/compiled.py)."""
    if runner not in ("hflm", "packed"):
        raise CompruneError(f"unknown zero-shot runner '{runner}': use hflm or packed")
    names = parse_tasks(tasks)
    if limit is not None and subset is not None:
        raise CompruneError("--limit and --subset both given: use one (limit = first N, subset = N drawn)")
    if heldout and subset is None:
        raise CompruneError("--heldout needs --subset N: the held-out examples are the ones that subset leaves out")
    for flag, v in (("limit", limit), ("subset", subset)):
        if v is not None and v < 1:
            raise CompruneError(f"--{flag} must be a positive number of examples, got {v}")
    compile = compiled.resolve(compile, None if limit is None and subset is None else 0)
    version = harness_version()
    root = resolve_data_dir(data_dir)
    configs = {t: task_config(t, root) for t in names}  # checks every file before any slow work
    log = logging.getLogger("lm_eval")
    level = log.level
    if not progress:  # the harness warns on every in-memory model; keep quiet output quiet
        log.setLevel(logging.ERROR)
    try:
        return _run(model, tokenizer, names, configs, version, limit, subset, batch_size, seed, cache_key, cache_dir,
                    per_example, runner, heldout, compile)
    finally:
        log.setLevel(level)


def _json_cache(lm, path):
    """lm_eval's CachingLM stores pickles (sqlitedict's default), and unpickling a db someone else wrote runs their
    code: store JSON instead (responses are numbers, booleans and strings). A db of pickles is not read."""
    import sqlite3

    from sqlitedict import SqliteDict
    lm.dbdict.close()
    try:
        with sqlite3.connect(path) as con:
            row = con.execute("SELECT value FROM unnamed LIMIT 1").fetchone()
    except sqlite3.Error:
        row = None
    if row is not None and isinstance(row[0], bytes) and row[0][:1] == b"\x80":
        raise CompruneError(f"{path} is an lm_eval cache of pickles, which comprune does not read (it could run "
                            "code): delete it, or pass another cache directory")
    # the cache gives back exactly what lm_eval stored (a log-likelihood may be -inf), in strict JSON
    lm.dbdict = SqliteDict(str(path), autocommit=True, encode=lambda obj: json_text(obj, exact=True), decode=loads_exact)
    from lm_eval.api.model import CacheHook
    lm.lm.set_cache_hook(CacheHook(lm))  # the hook holds the db it writes partial results to


def packed_lm_class(HFLM, compile: bool = False):
    """HFLM whose loglikelihood requests go through evaluate/packed.py (lm_eval's own loop where it does not apply)."""
    class PackedLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            out = packed.loglikelihoods(self.model, [(c, k) for _, c, k in requests], self.max_length,
                                        progress=not disable_tqdm, compile=compile)
            if out is None:
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            for (key, _, _), answer in zip(requests, out):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return out
    return PackedLM


def _run(model, tokenizer, names, configs, version, limit, subset, batch_size, seed, cache_key, cache_dir,
         per_example=False, runner="hflm", heldout=False, compile=False):
    lm_eval = deferred.lm_eval("evaluator", "api.model", "models.huggingface", "tasks")
    CachingLM, HFLM, TaskManager = lm_eval.api.model.CachingLM, lm_eval.models.huggingface.HFLM, lm_eval.tasks.TaskManager
    random.seed(seed)  # the harness seeds these itself in simple_evaluate; mirror it
    t0 = time.time()
    lm_cls = packed_lm_class(HFLM, compile) if runner == "packed" else HFLM
    lm = lm_cls(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    if cache_key:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", cache_key)
        db = Path(cache_dir) if cache_dir else comprune_cache() / "lm_eval"
        lm = CachingLM(lm, str(db / f"{safe}_rank0.db"))
        _json_cache(lm, db / f"{safe}_rank0.db")
    loaded = TaskManager(include_defaults=False).load([cfg for cfg, _ in configs.values()])
    for task_obj in loaded["tasks"].values():
        task_obj.set_fewshot_seed(seed=seed)
    samples = {t: subset_indices(n, subset, seed, heldout) for t, (_, n) in configs.items()} if subset else None
    out = lm_eval.evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, samples=samples, log_samples=per_example,
                             bootstrap_iters=1000)  # acc means use the closed-form stderr; 0 would drop it
    results = {}
    for t in names:
        n = out["n-samples"][t]["effective"]
        results[t] = _metrics(t, out["results"][t], n)
        if per_example:
            results[t].update(_per_example(out["samples"][t], PAPER_METRIC[t]))
    return {"harness_version": version, "tasks": results, "average": paper_average(results),
            "average_metric_note": average_note(names), "subset": subset,
            "subset_rule": (f"sorted(random.Random({seed}).sample(range(n_docs), {subset}))" +
                            (f", then {subset} others drawn with random.Random('{seed}-heldout') (held out)"
                             if heldout else "")) if subset else None,
            "heldout": heldout,
            "limit": limit, "seconds": round(time.time() - t0, 1), "runner": runner,
            "compiled": bool(compile and runner == "packed")}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def format_zeroshot_table(result: dict) -> str:
    """Plain-text table: one row per task (acc, acc_norm with stderr, n) plus the paper-average row."""
    head = ["task", "acc", "± stderr", "acc_norm", "± stderr", "n", "paper metric"]
    rows = []
    for t, r in result["tasks"].items():
        mark = "≈" if r.get("approximate") else ""
        rows.append([mark + t, _pct(r["acc"]), _pct(r["acc_stderr"]), _pct(r["acc_norm"]),
                     _pct(r["acc_norm_stderr"]), str(r["n"]), r["metric"]])
    rows.append(["average", "", "", "", "", "", _pct(result.get("average"))])
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    sel = (f"subset {result['subset']} per task (fixed seed)" if result.get("subset")
           else f"first {result['limit']} per task" if result.get("limit") else "full sets")
    lines.append(f"accuracy in %; {sel}; lm_eval {result.get('harness_version')}; {result.get('seconds')} s")
    lines.append(f"average: {result.get('average_metric_note')}")
    if any(r.get("approximate") for r in result["tasks"].values()):
        lines.append("≈ approximate: HellaSwag rebuilt from a text extract (ctx_b capitalisation guessed)")
    return "\n".join(lines)
