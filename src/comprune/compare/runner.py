"""A comparison's stages and their order: dense and every method x ratio pruned, evaluated and recorded, each
step skipped when its result is already recorded (resumable; see the package docstring)."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from ..card import record_evaluation
from ..config import PRESETS
from ..registry import names as method_names
from ..data import load_ids
from ..errors import CompruneError
from ..evaluate.chat import chat_measure, chat_reference
from ..evaluate.perplexity import perplexity
from ..evaluate.speed import relative_speed
from ..evaluate.significance import average_stderr
from ..evaluate.zeroshot import average_note, evaluate_zeroshot, paper_average, parse_tasks
from ..devices import resolve_precision
from ..precision import host
from ..loading import count_params, load, spec_config
from ..stream import can_stream
from .stages import ROWS, STAGE_FLAGS, split_row, unknown_stages
from .llamacpp import llamacpp_speed
from .measure import check_same_model, prune_run, runtime_floor
from .records import (DEFAULT_METHODS, DEFAULT_OUT, REDOABLE, RSS_PROBE, STAGES, STREAM_RECORD, card_entries,
                      check_results_dir, log, ppl_key, read_json, run_name, set_aside_corrupt, write_json)
from .report import write_reports


class Comparison:
    def __init__(self, model_spec="smollm2", ratios=(0.1, 0.2, 0.3), methods=DEFAULT_METHODS, out_dir=DEFAULT_OUT,
                 calib="c4", nsamples=128, seqlen=128, seed=0, ppl_seqlens=(128, 2048), ppl_max_tokens=65536,
                 full_ratio: float | None = 0.2, zeroshot_ratio: float | None = 0.2, zeroshot_tasks="paper7",
                 zeroshot_subset: int | None = 200, zeroshot_batch_size=16, speed_tokens=64, speed_repeats=3,
                 data_dir=None, dtype="float32", keep_models=False, skip=(), prune_args=None, progress=True,
                 dense_cache_key=None, zeroshot_cache_dir=None, python=None, stream_ratios=None, redo=(),
                 redo_tag=None, zeroshot_full=False, trust_remote_code=False, allow_pickle=False, full_seqlens=None,
                 compile="auto", nproc=1):
        for m in methods:  # a preset (e.g. comp-search) is compared as a method of its own
            base = split_row(m)[0]
            if base not in method_names() and base not in PRESETS:
                raise CompruneError(f"unknown method '{m}': use some of {', '.join(method_names() + tuple(PRESETS))}")
            if unknown_stages(m):
                raise CompruneError(f"unknown recovery stage '{unknown_stages(m)[0]}' in '{m}': use "
                                    f"{' or '.join('+' + s for s in STAGE_FLAGS)} (e.g. {ROWS[0]})")
        for r in ratios:
            if not 0 < r <= 0.9:
                raise CompruneError(f"ratio {r} out of (0, 0.9]: e.g. --ratios 0.1,0.2,0.3")
        bad = set(skip) - set(STAGES)
        if bad:
            raise CompruneError(f"unknown stage(s) {', '.join(sorted(bad))} in --skip: use some of {', '.join(STAGES)}")
        bad = set(redo) - set(REDOABLE)
        if bad:
            raise CompruneError(f"--redo {', '.join(sorted(bad))}: only {', '.join(REDOABLE)} can be measured again "
                                "(the other stages' results are deterministic)")
        # Stages measured again (e.g. on a quiet machine); a result carrying this tag is already redone, so an
        # interrupted --redo resumes when run again with the same tag.
        self.redo, self.redo_tag = set(redo), redo_tag or "redo"
        self.model_spec, self.ratios, self.methods = str(model_spec), [float(r) for r in ratios], list(methods)
        self.out = Path(out_dir)
        self.calib, self.nsamples, self.seqlen, self.seed = calib, nsamples, seqlen, seed
        self.ppl_seqlens, self.ppl_max_tokens = [int(s) for s in ppl_seqlens], ppl_max_tokens
        # the full test set costs ~18x the slice: on a slow host it can be run at the headline length only
        self.full_seqlens = [int(s) for s in full_seqlens] if full_seqlens else self.ppl_seqlens
        if not set(self.full_seqlens) <= set(self.ppl_seqlens):
            raise CompruneError(f"--full-seqlens {self.full_seqlens} must be among the slice's {self.ppl_seqlens}")
        self.full_ratio, self.zeroshot_ratio = full_ratio, zeroshot_ratio
        self.zeroshot_tasks, self.zeroshot_subset, self.zeroshot_batch_size = zeroshot_tasks, zeroshot_subset, \
            zeroshot_batch_size
        self.compile = compile  # torch.compile in the evaluator: "auto" = the long evaluations only
        self.zeroshot_full = bool(zeroshot_full)  # also the seven tasks' full sets (stage zeroshot_full)
        self.speed_tokens, self.speed_repeats = speed_tokens, speed_repeats
        self.data_dir, self.keep_models, self.skip = data_dir, keep_models, set(skip)
        # "auto" is resolved once here, so every prune subprocess and evaluation runs the same concrete precision
        # and a results directory made in one precision is never extended in another
        self.precision = resolve_precision(dtype, "cpu", spec_config(str(model_spec)))[1].to_dict()
        self.dtype = self.precision["dtype"]
        self.prune_args = dict(prune_args or {})
        self.show = progress
        self.dense_cache_key = dense_cache_key
        # the response cache lives in the output the user owns (never a shared cache someone else can write)
        self.zeroshot_cache_dir = zeroshot_cache_dir or self.out / "zeroshot-cache"
        self.python = python or sys.executable
        if int(nproc) < 1:
            raise CompruneError(f"--nproc {nproc}: pass 1 or more processes per prune")
        self.nproc = int(nproc)  # > 1: each prune is a torchrun group of this many processes (comprune.distributed)
        # the source model's consent flags, for the dense model here and every prune process (measure.prune_run)
        self.trust_remote_code, self.allow_pickle = bool(trust_remote_code), bool(allow_pickle)
        self.load_flags = ["--trust-remote-code"] * self.trust_remote_code + ["--allow-pickle"] * self.allow_pickle
        # Streamed prunes (memory and time only: the weights are checked equal) at these ratios; default: the
        # zero-shot ratio when it is compared, else every ratio.
        if stream_ratios is None:
            headline = [r for r in self.ratios if zeroshot_ratio is not None and abs(r - zeroshot_ratio) < 1e-9]
            stream_ratios = headline or self.ratios
        self.stream_ratios = [float(r) for r in stream_ratios]
        self._dense = None
        self._machine = None
        self._ids = None
        self._chat_ref = None

    # ------------------------------------------------------------------------------------------ bookkeeping
    def settings(self) -> dict:
        return {"model": self.model_spec, "ratios": self.ratios, "methods": self.methods, "calib": self.calib,
                "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed,
                "ppl_seqlens": self.ppl_seqlens, "ppl_max_tokens": self.ppl_max_tokens,
                "full_seqlens": self.full_seqlens,
                "full_ratio": self.full_ratio, "zeroshot_ratio": self.zeroshot_ratio,
                "zeroshot_tasks": self.zeroshot_tasks, "zeroshot_subset": self.zeroshot_subset,
                "zeroshot_full": self.zeroshot_full,
                "speed_tokens": self.speed_tokens, "speed_repeats": self.speed_repeats, "dtype": self.dtype,
                "precision": self.precision,
                "stream_ratios": self.stream_ratios,
                "prune_args": self.prune_args, "machine": self._machine,
                **({"nproc": self.nproc} if self.nproc > 1 else {})}

    def run_path(self, name: str) -> Path:
        return self.out / "runs" / f"{name}.json"

    def model_dir(self, name: str) -> Path:
        return self.out / "models" / name

    def _save(self, name: str, rec: dict):
        rec["host"] = host()  # the machine and its load when this run's latest stage finished
        write_json(self.run_path(name), rec)
        self.write_reports()

    def ppl_key(self, seqlen: int, full: bool) -> str:
        return ppl_key(seqlen, full, self.ppl_max_tokens)

    # ----------------------------------------------------------------------------------------------- models
    def dense(self):
        if self._dense is None:
            self._dense = load(self.model_spec, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                               allow_pickle=self.allow_pickle)
        return self._dense

    def wikitext_ids(self, tok):
        if self._ids is None:
            self._ids = load_ids(tok, "wikitext2", self.data_dir)
        return self._ids

    def prune_run(self, method: str, ratio: float, stream: bool = False) -> dict:
        return prune_run(self, method, ratio, stream)

    def same_evaluations(self, name: str, rec: dict, new: dict) -> bool:
        """A re-pruned run whose old record has no weight digest (older records) is checked by its first slice
        perplexity: the re-pruned model must reproduce it (to float rounding), else its evaluations are dropped.
        With digests on both sides the digest decides."""
        if rec["prune"].get("weights_sha256"):
            return rec["prune"]["weights_sha256"] == new["weights_sha256"]
        key = self.ppl_key(self.ppl_seqlens[0], False)
        old = rec.get("ppl", {}).get(key, {}).get("ppl")
        if old is None:
            return True
        model, tok = load(self.model_dir(name), dtype=self.dtype)
        got = perplexity(model, tok, "wikitext2", seqlen=self.ppl_seqlens[0], max_tokens=self.ppl_max_tokens,
                         ids=self.wikitext_ids(tok), progress=self.show)["ppl"]
        same = abs(got - old) <= 1e-5 * old
        new["reverified"] = {"key": key, "recorded": old, "recomputed": got, "same": same}
        log(f"{name}: {key} recorded {old:.4f}, re-pruned model gives {got:.4f}" +
             ("" if same else ": a different model, its evaluations are redone"), True)
        return same

    def ensure_model(self, name: str, rec: dict):
        """The pruned model of a run, re-pruned (deterministically) if its directory was deleted."""
        d = self.model_dir(name)
        if not (d / "pruning.json").is_file():
            new = self.prune_run(rec["method"], rec["ratio"])
            if "prune" in rec:  # the evaluations already recorded must still be of this very model
                check_same_model(name, rec["prune"], new)
                new["superseded"] = {k: rec["prune"].get(k) for k in ("seconds", "peak_rss_mb", "wall_seconds")}
            rec["prune"] = new
            self._save(name, rec)
        return load(d, dtype=self.dtype)

    # -------------------------------------------------------------------------------------------- metrics
    def eval_ppl(self, model, tok, full: bool, have=()):
        """Yields (key, result) per window length not already in `have`."""
        for s in self.full_seqlens if full else self.ppl_seqlens:
            key = self.ppl_key(s, full)
            if key in have:
                continue
            yield key, perplexity(model, tok, "wikitext2", seqlen=s, max_tokens=None if full else self.ppl_max_tokens,
                                  ids=self.wikitext_ids(tok), progress=self.show, compile=self.compile)

    def eval_zeroshot(self, name: str, stage: str, rec: dict, model, tok, cache_key: str) -> dict:
        """Zero-shot scores task by task into rec[stage], saved after each task (a rerun does only the missing
        ones): the fixed-seed subset for "zeroshot" (the quick mode), the full sets for "zeroshot_full". Every
        example's correctness is kept for the paired tests (evaluate.significance)."""
        subset = self.zeroshot_subset if stage == "zeroshot" else None
        res = rec.setdefault(stage, {"tasks": {}})
        for task in parse_tasks(self.zeroshot_tasks):
            if task in res["tasks"]:
                continue
            r = evaluate_zeroshot(model, tok, [task], subset=subset, data_dir=self.data_dir,
                                  batch_size=self.zeroshot_batch_size, progress=self.show, cache_key=cache_key,
                                  cache_dir=self.zeroshot_cache_dir, per_example=True, compile=self.compile)
            res["tasks"][task] = {**r["tasks"][task], "seconds": r["seconds"], "runner": r.get("runner"),
                                  "compiled": r.get("compiled")}
            res.update({k: v for k, v in r.items() if k in ("harness_version", "subset", "subset_rule", "limit")})
            res["seconds"] = round(sum(t.get("seconds", 0) for t in res["tasks"].values()), 1)
            # an average over some of the tasks is not the seven-task average: none until every task is in
            complete = not self.zeroshot_missing(stage, rec)
            res["average"] = paper_average(res["tasks"]) if complete else None
            res["average_stderr"] = average_stderr([t.get(f"{t['metric']}_stderr") for t in res["tasks"].values()]) \
                if complete else None
            res["average_metric_note"] = average_note(list(res["tasks"]))
            self._save(name, rec)
        return res

    def zeroshot_missing(self, stage: str, rec: dict) -> bool:
        return bool(set(parse_tasks(self.zeroshot_tasks)) - set(rec.get(stage, {}).get("tasks", {})))

    def redo_pending(self, name: str, stage: str, rec: dict) -> bool:
        return stage in self.redo and name != "dense" and stage in rec and \
            rec[stage].get("redo_tag") != self.redo_tag

    def needed(self, name: str, stage: str, rec: dict) -> bool:
        if stage in self.skip:
            return False
        if self.redo_pending(name, stage, rec):
            return True
        if stage in ("ppl", "full"):
            full = stage == "full"
            return any(self.ppl_key(s, full) not in rec.get("ppl", {})
                       for s in (self.full_seqlens if full else self.ppl_seqlens))
        if stage == "prune":
            return name != "dense" and rec.get("prune", {}).get("rss_probe") != RSS_PROBE
        if stage in ("zeroshot", "zeroshot_full"):
            return (stage == "zeroshot" or self.zeroshot_full) and self.zeroshot_missing(stage, rec)
        if stage in ("speed", "llamacpp"):
            return name != "dense" and stage not in rec
        if stage == "stream":
            # a preset streams as its method does (the width search runs block by block, resident like the walk)
            return name != "dense" and can_stream(PRESETS.get(rec["method"], {}).get("method", rec["method"])) and \
                any(abs(rec["ratio"] - r) < 1e-9 for r in self.stream_ratios) and \
                (rec.get("stream", {}).get("rss_probe") != RSS_PROBE or
                 rec.get("stream", {}).get("record_version") != STREAM_RECORD)
        return stage not in rec

    def step(self, name: str, stage: str):
        """Do one stage of one run (name 'dense' or method-r<ratio>) unless its result is already there."""
        if stage in self.skip:
            return
        is_dense = name == "dense"
        rec = read_json(self.run_path(name))
        if not rec:
            rec = {"method": "dense", "ratio": 0.0} if is_dense else \
                {"method": name.rsplit("-r", 1)[0], "ratio": float(name.rsplit("-r", 1)[1])}
        if rec.get("errors", {}).get("prune"):
            rec["errors"].pop("prune")  # retry failed prunes on a rerun
        if not self.needed(name, stage, rec):
            return
        if not is_dense and stage != "prune" and "prune" not in rec:
            return  # its pruning failed (see errors): nothing to evaluate
        try:
            if stage == "prune":
                self._prune_stage(name, stage, rec)
            elif stage == "stream":
                self._stream_stage(name, rec)
            else:
                self._eval_stage(name, stage, rec)
            rec.get("errors", {}).pop(stage, None)
            self._save(name, rec)
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the others; it is recorded
            msg = str(e) if isinstance(e, CompruneError) else f"{e.__class__.__name__}: {e}"
            log(f"{stage} {name} failed: {msg}", True)
            rec.setdefault("errors", {})[stage] = msg
            self._save(name, rec)

    def _prune_stage(self, name: str, stage: str, rec: dict):
        new = self.prune_run(rec["method"], rec["ratio"])
        if "prune" in rec:  # measured again: evaluations stay valid only for the very same model
            check_same_model(name, rec["prune"], new)
            new["superseded"] = {k: rec["prune"].get(k) for k in ("seconds", "peak_rss_mb", "wall_seconds")}
            if not self.same_evaluations(name, rec, new):
                for stage_result in ("ppl", "speed", "llamacpp", "zeroshot", "zeroshot_full", "chat", "eval_seconds"):
                    rec.pop(stage_result, None)  # a different model: everything is measured again
        if stage in self.redo:
            new["redo_tag"] = self.redo_tag
        rec["prune"] = new

    def _stream_stage(self, name: str, rec: dict):
        st = self.prune_run(rec["method"], rec["ratio"], stream=True)
        shutil.rmtree(self.model_dir(name + "-stream"), ignore_errors=True)
        st["identical_to_in_memory"] = st["weights_sha256"] == rec["prune"].get("weights_sha256")
        rec["stream"] = {k: st.get(k) for k in ("seconds", "wall_seconds", "peak_rss_mb", "rss_probe",
                                                "weights_sha256", "identical_to_in_memory", "streaming",
                                                "command")}
        rec["stream"]["record_version"] = STREAM_RECORD
        if "stream" in self.redo:
            rec["stream"]["redo_tag"] = self.redo_tag

    def _eval_stage(self, name: str, stage: str, rec: dict):
        is_dense = name == "dense"
        dense, tok = self.dense()
        if is_dense:
            rec.setdefault("params", count_params(dense))
            model = dense
        else:
            model, tok = self.ensure_model(name, rec)
            rec["params"] = rec["prune"]["params_after"]
        t0 = time.perf_counter()
        log(f"{stage} {name}", self.show)
        if stage in ("ppl", "full"):
            for key, r in self.eval_ppl(model, tok, full=stage == "full", have=rec.get("ppl", {})):
                rec.setdefault("ppl", {})[key] = r
                self._save(name, rec)  # each window length as it completes
        elif stage == "speed":
            rec["speed"] = relative_speed(model, dense, tok, new_tokens=self.speed_tokens,
                                          repeats=self.speed_repeats)
            if stage in self.redo:
                rec["speed"]["redo_tag"] = self.redo_tag
        elif stage == "llamacpp":
            rec["llamacpp"] = llamacpp_speed(self, name, self.model_dir(name), tok)
            if stage in self.redo:
                rec["llamacpp"]["redo_tag"] = self.redo_tag
        elif stage == "chat":  # the reported half; the dense model's answers are the KL's reference
            if self._chat_ref is None:
                self._chat_ref = chat_reference(dense, tok, "test")
            rec["chat"] = chat_measure(model, tok, self._chat_ref, "test")
        elif stage in ("zeroshot", "zeroshot_full"):
            # keyed by the weights' digest too: a method whose code changed prunes another model under the same
            # name and calibration, and must not be answered from the old model's cached responses
            calib = rec.get("prune", {}).get("calibration", {}).get("sha256", "")[:12]
            weights = rec.get("prune", {}).get("weights_sha256", "")[:12]
            key = ((self.dense_cache_key or f"{self.model_spec}-dense-{self.dtype}") if is_dense else
                   f"compare-{self.model_spec}-{name}-{calib}-{weights}-{self.dtype}")
            self.eval_zeroshot(name, stage, rec, model, tok, key)
        rec.setdefault("eval_seconds", {})[stage] = round(time.perf_counter() - t0, 1)
        if not is_dense:  # the pruned model's card shows what this comparison measured
            for entry in card_entries(stage, rec, self.dtype):
                record_evaluation(self.model_dir(name), entry)

    def plan(self) -> list[tuple[str, str]]:
        """(run, stage) in the order the work is done: the headline ratio first (prune, streamed prune, slice
        perplexity, speed), then the other ratios, then zero-shot at the headline ratio, then full-test-set perplexity."""
        first = [r for r in self.ratios if self.zeroshot_ratio is not None and abs(r - self.zeroshot_ratio) < 1e-9]
        rest = [r for r in self.ratios if r not in first]
        steps = [("dense", "ppl"), ("dense", "chat")]
        for r in first + rest:
            for m in self.methods:
                steps += [(run_name(m, r), s) for s in ("prune", "stream", "ppl", "speed", "chat", "llamacpp")]
        if first:
            steps += [("dense", "zeroshot")] + [(run_name(m, r), "zeroshot") for r in first for m in self.methods]
        if self.full_ratio is not None and any(abs(r - self.full_ratio) < 1e-9 for r in self.ratios):
            steps += [("dense", "full")] + [(run_name(m, self.full_ratio), "full") for m in self.methods]
        if first and self.zeroshot_full:  # hours of CPU: last, after every quick number
            steps += [("dense", "zeroshot_full")] + [(run_name(m, r), "zeroshot_full") for r in first
                                                     for m in self.methods]
        return steps

    def finished(self, name: str) -> bool:
        """Every stage this run needs is done (its model directory may then go)."""
        rec = read_json(self.run_path(name))
        return not any(n == name and self.needed(n, s, rec) for n, s in self.plan())

    def run(self) -> dict:
        check_results_dir(self.out)
        set_aside_corrupt(self.out / "runs")
        self._machine = host()
        settings_path = self.out / "settings.json"
        old = read_json(settings_path)
        if old and {k: old.get(k) for k in ("model", "calib", "nsamples", "seqlen", "seed", "dtype")} != \
                {k: self.settings()[k] for k in ("model", "calib", "nsamples", "seqlen", "seed", "dtype")}:
            raise CompruneError(f"{self.out} holds a comparison with other model/calibration settings: "
                                "use another --out (results of different calibrations must not be mixed)")
        write_json(settings_path, {**old, **self.settings()})
        self.runtime_floor()
        for name, stage in self.plan():
            self.step(name, stage)
            if name != "dense" and not self.keep_models and self.finished(name):
                shutil.rmtree(self.model_dir(name), ignore_errors=True)
        return self.write_reports()

    def runtime_floor(self) -> dict:
        return runtime_floor(self.out, self.model_spec, self.dtype, self.python, self.trust_remote_code)

    def write_reports(self) -> dict:
        return write_reports(self.out, self.settings())


def compare(model_spec="smollm2", ratios=(0.1, 0.2, 0.3), methods=DEFAULT_METHODS, out_dir=DEFAULT_OUT, **kw) -> dict:
    """Prune `model_spec` with every method at every ratio and evaluate them alike (see the module docstring).
    Returns the results dict also written to `<out_dir>/results.json` (+ results.md, results.png)."""
    return Comparison(model_spec, ratios, methods, out_dir, **kw).run()
