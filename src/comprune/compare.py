"""comprune.compare: COMP and the baselines on one model, same calibration data, same evaluation.

Every method x ratio is pruned in its own subprocess (`python -m comprune.cli prune ... --json`), so the
pruning time and peak RSS reported are that method's alone, and every prune gets the same calibration
source/seed (the manifests' calibration sha256 must agree; the comparison checks it). Evaluation runs here:

- WikiText-2 perplexity at 128 and 2048 tokens on a fixed slice (the first `ppl_max_tokens` tokens of the test
  stream) for every run; the full test set for the runs at `full_ratio` (and dense);
- the seven-task zero-shot average (`evaluate_zeroshot(..., "paper7", subset=200)`) at `zeroshot_ratio`;
- parameters, pruning seconds, pruning peak RSS (the pruning process's own, from wait4 through a small
  launcher: `run_with_peak_rss`); greedy generation tokens/s
  relative to the dense model (`evaluate.speed.relative_speed`, measured alternately with the dense model);
- for methods that stream (`comprune prune --stream`), a second prune from disk one block at a time in its own
  process: its seconds and peak RSS, and a check that its weights equal the in-memory prune's (sha256);
- once, the runtime floor: the peak RSS of a process that imports comprune and builds the model's skeleton
  without weights, which every pruning process pays before its own work.

Resumable: each run's results live in `<out>/runs/<method>-r<ratio>.json`, written after every metric; a rerun
skips what is there. Work is ordered so the most useful numbers come first: the `zeroshot_ratio` runs
(prune, slice perplexity, speed), the other ratios, the zero-shot scores, then the full-test-set perplexity.
`<out>/results.json`, `results.md` and `results.png` are rewritten after every step.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .errors import CompruneError

DEFAULT_METHODS = ("comp", "llm-pruner", "flap", "layer-drop", "wanda-sp")
DEFAULT_OUT = "benchmarks/results/compare"
STAGES = ("prune", "ppl", "speed", "stream", "zeroshot", "full")
REDOABLE = ("prune", "speed")  # measurements of time and memory; the others are deterministic
# How prune records measured peak memory. Records with another probe (or none: getrusage's ru_maxrss in the
# prune itself, which Linux carries across exec from the launching process) are re-pruned (same model,
# checked) to measure again.
RSS_PROBE = "wait4"
# Streamed prunes recorded before this version ran on transformers' modules (a heavier runtime): measure again.
STREAM_RECORD = 2

# Runs a command as a grandchild and prints its peak RSS (KiB) from wait4 as the last stderr line. Through
# this small process the prune's ru_maxrss starts from the launcher's ~10 MB, not from the comparison
# driver's GBs (Linux carries ru_maxrss across exec), and wait4 sees the kernel's final high-water mark,
# which can exceed the VmHWM a process reads of itself while running.
_LAUNCHER = ("import os, sys\n"
             "pid = os.fork()\n"
             "if pid == 0:\n"
             "    os.execvp(sys.argv[1], sys.argv[1:])\n"
             "_, status, ru = os.wait4(pid, 0)\n"
             "print(f'comprune-peak-rss-kib {ru.ru_maxrss}', file=sys.stderr, flush=True)\n"
             "sys.exit(os.waitstatus_to_exitcode(status) % 256)\n")


def run_with_peak_rss(cmd: list[str], stdout, stderr_path: Path, env=None) -> tuple[int, str, float | None]:
    """(exit code, stdout text, peak RSS in MiB of the command's own process or None)."""
    with open(stderr_path, "w") as err:
        r = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], stdout=stdout, stderr=err, text=True, env=env)
    peak = None
    for line in reversed(stderr_path.read_text().splitlines()):
        if line.startswith("comprune-peak-rss-kib "):
            peak = int(line.split()[1]) / 1024
            break
    return r.returncode, r.stdout, peak


def run_name(method: str, ratio: float) -> str:
    return f"{method}-r{ratio:.2f}"


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(path: Path, obj: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _log(msg: str, show: bool):
    if show:
        print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _check_same_model(name: str, old: dict, new: dict):
    """A re-pruned run must give the model its evaluations were made on (pruning is deterministic)."""
    keys = ["params_after", "removed_layers", "mlp_widths"] + (["weights_sha256"] if old.get("weights_sha256") else [])
    diff = [k for k in keys if old.get(k) != new.get(k)]
    if diff:
        raise CompruneError(f"re-pruning {name} gave a different model ({', '.join(diff)} changed): its evaluations "
                            f"no longer apply; delete its runs/{name}.json to evaluate the new model")


class Comparison:
    def __init__(self, model_spec="smollm2", ratios=(0.1, 0.2, 0.3), methods=DEFAULT_METHODS, out_dir=DEFAULT_OUT,
                 calib="c4", nsamples=128, seqlen=128, seed=0, ppl_seqlens=(128, 2048), ppl_max_tokens=65536,
                 full_ratio: float | None = 0.2, zeroshot_ratio: float | None = 0.2, zeroshot_tasks="paper7",
                 zeroshot_subset: int | None = 200, zeroshot_batch_size=16, speed_tokens=64, speed_repeats=3,
                 data_dir=None, dtype="float32", keep_models=False, skip=(), prune_args=None, progress=True,
                 dense_cache_key=None, zeroshot_cache_dir=None, python=None, stream_ratios=None, redo=(),
                 redo_tag=None):
        from .config import METHODS
        for m in methods:
            if m not in METHODS:
                raise CompruneError(f"unknown method '{m}': use some of {', '.join(METHODS)}")
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
        self.full_ratio, self.zeroshot_ratio = full_ratio, zeroshot_ratio
        self.zeroshot_tasks, self.zeroshot_subset, self.zeroshot_batch_size = zeroshot_tasks, zeroshot_subset, \
            zeroshot_batch_size
        self.speed_tokens, self.speed_repeats = speed_tokens, speed_repeats
        self.data_dir, self.dtype, self.keep_models, self.skip = data_dir, dtype, keep_models, set(skip)
        self.prune_args = dict(prune_args or {})
        self.show = progress
        self.dense_cache_key = dense_cache_key
        # the response cache lives in the output the user owns (never a shared cache someone else can write)
        self.zeroshot_cache_dir = zeroshot_cache_dir or self.out / "zeroshot-cache"
        self.python = python or sys.executable
        # Streamed prunes (memory and time only: the weights are checked equal) at these ratios; default: the
        # zero-shot ratio when it is compared, else every ratio.
        if stream_ratios is None:
            headline = [r for r in self.ratios if zeroshot_ratio is not None and abs(r - zeroshot_ratio) < 1e-9]
            stream_ratios = headline or self.ratios
        self.stream_ratios = [float(r) for r in stream_ratios]
        self._dense = None
        self._ids = None

    # ------------------------------------------------------------------------------------------ bookkeeping
    def settings(self) -> dict:
        return {"model": self.model_spec, "ratios": self.ratios, "methods": self.methods, "calib": self.calib,
                "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed,
                "ppl_seqlens": self.ppl_seqlens, "ppl_max_tokens": self.ppl_max_tokens,
                "full_ratio": self.full_ratio, "zeroshot_ratio": self.zeroshot_ratio,
                "zeroshot_tasks": self.zeroshot_tasks, "zeroshot_subset": self.zeroshot_subset,
                "speed_tokens": self.speed_tokens, "speed_repeats": self.speed_repeats, "dtype": self.dtype,
                "stream_ratios": self.stream_ratios,
                "prune_args": self.prune_args}

    def run_path(self, name: str) -> Path:
        return self.out / "runs" / f"{name}.json"

    def model_dir(self, name: str) -> Path:
        return self.out / "models" / name

    def _save(self, name: str, rec: dict):
        _write(self.run_path(name), rec)
        self.write_reports()

    def ppl_key(self, seqlen: int, full: bool) -> str:
        return f"wikitext2@{seqlen}" + ("/full" if full else f"/{self.ppl_max_tokens}")

    # ----------------------------------------------------------------------------------------------- models
    def dense(self):
        if self._dense is None:
            from .loading import load
            self._dense = load(self.model_spec, dtype=self.dtype)
        return self._dense

    def wikitext_ids(self, tok):
        if self._ids is None:
            from .data import load_ids
            self._ids = load_ids(tok, "wikitext2", self.data_dir)
        return self._ids

    def prune_run(self, method: str, ratio: float, stream: bool = False) -> dict:
        from .io import weights_digest
        name = run_name(method, ratio)
        out = self.model_dir(name + ("-stream" if stream else ""))
        log = self.out / "logs" / f"{name}.prune{'-stream' if stream else ''}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, "-m", "comprune.cli", "prune", self.model_spec, "--method", method, "--ratio", str(ratio),
               "--calib", self.calib, "--nsamples", str(self.nsamples), "--seqlen", str(self.seqlen),
               "--seed", str(self.seed), "--dtype", self.dtype, "--out", str(out), "--force", "--json"]
        if self.data_dir:
            cmd += ["--data-dir", str(self.data_dir)]
        for k, v in self.prune_args.get(method, {}).items():
            cmd += [f"--{k}"] if v is True else [f"--{k}", str(v)]
        if stream:
            cmd += ["--stream"]
        _log(f"prune {name}{' (streamed)' if stream else ''}: {' '.join(cmd[1:])}", self.show)
        t0 = time.perf_counter()
        code, stdout, peak = run_with_peak_rss(cmd, subprocess.PIPE, log,
                                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        wall = time.perf_counter() - t0
        if code != 0:
            tail = log.read_text().strip().splitlines()[-3:]
            raise CompruneError(f"pruning {name} failed (exit {code}): {' | '.join(tail)}; log: {log}")
        rep = json.loads(stdout)
        keep = ("method", "ratio_requested", "ratio_achieved", "params_before", "params_after", "removed_layers",
                "kept_layers", "mlp_widths", "seconds", "peak_rss_mb", "calibration", "budget", "config", "details",
                "versions")
        rec = {k: rep.get(k) for k in keep}
        rec["wall_seconds"] = round(wall, 2)
        rec["command"] = " ".join(["python"] + cmd[1:])
        rec["rss_probe"] = RSS_PROBE
        rec["self_reported_peak_rss_mb"] = rec.get("peak_rss_mb")
        if peak is not None:  # the larger of the two: the process's own VmHWM at its end, wait4's ru_maxrss
            rec["peak_rss_mb"] = max(peak, rec.get("peak_rss_mb") or 0)
        rec["weights_sha256"] = weights_digest(out)
        man = _read(out / "pruning.json")
        if stream:
            rec["streaming"] = man.get("streaming")
        rec["attention_heads"] = [b.get("heads") for _, b in sorted(man.get("blocks", {}).items(),
                                                                     key=lambda kv: int(kv[0]))]
        return rec

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
        from .evaluate.perplexity import perplexity
        from .loading import load
        model, tok = load(self.model_dir(name), dtype=self.dtype)
        got = perplexity(model, tok, "wikitext2", seqlen=self.ppl_seqlens[0], max_tokens=self.ppl_max_tokens,
                         ids=self.wikitext_ids(tok), progress=self.show)["ppl"]
        same = abs(got - old) <= 1e-5 * old
        new["reverified"] = {"key": key, "recorded": old, "recomputed": got, "same": same}
        _log(f"{name}: {key} recorded {old:.4f}, re-pruned model gives {got:.4f}" +
             ("" if same else ": a different model, its evaluations are redone"), True)
        return same

    def ensure_model(self, name: str, rec: dict):
        """The pruned model of a run, re-pruned (deterministically) if its directory was deleted."""
        from .loading import load
        d = self.model_dir(name)
        if not (d / "pruning.json").is_file():
            new = self.prune_run(rec["method"], rec["ratio"])
            if "prune" in rec:  # the evaluations already recorded must still be of this very model
                _check_same_model(name, rec["prune"], new)
                new["superseded"] = {k: rec["prune"].get(k) for k in ("seconds", "peak_rss_mb", "wall_seconds")}
            rec["prune"] = new
            self._save(name, rec)
        return load(d, dtype=self.dtype)

    # -------------------------------------------------------------------------------------------- metrics
    def eval_ppl(self, model, tok, full: bool, have=()):
        """Yields (key, result) per window length not already in `have`."""
        from .evaluate.perplexity import perplexity
        for s in self.ppl_seqlens:
            key = self.ppl_key(s, full)
            if key in have:
                continue
            yield key, perplexity(model, tok, "wikitext2", seqlen=s, max_tokens=None if full else self.ppl_max_tokens,
                                  ids=self.wikitext_ids(tok), progress=self.show)

    def eval_zeroshot(self, model, tok, cache_key: str) -> dict:
        from .evaluate.zeroshot import evaluate_zeroshot
        return evaluate_zeroshot(model, tok, self.zeroshot_tasks, subset=self.zeroshot_subset,
                                 data_dir=self.data_dir, batch_size=self.zeroshot_batch_size, progress=self.show,
                                 cache_key=cache_key, cache_dir=self.zeroshot_cache_dir)

    def redo_pending(self, name: str, stage: str, rec: dict) -> bool:
        return stage in self.redo and name != "dense" and stage in rec and \
            rec[stage].get("redo_tag") != self.redo_tag

    def needed(self, name: str, stage: str, rec: dict) -> bool:
        if stage in self.skip:
            return False
        if self.redo_pending(name, stage, rec):
            return True
        if stage in ("ppl", "full"):
            return any(self.ppl_key(s, stage == "full") not in rec.get("ppl", {}) for s in self.ppl_seqlens)
        if stage == "prune":
            return name != "dense" and rec.get("prune", {}).get("rss_probe") != RSS_PROBE
        if stage == "speed":
            return name != "dense" and stage not in rec
        if stage == "stream":
            from .stream import can_stream
            return name != "dense" and can_stream(rec["method"]) and \
                any(abs(rec["ratio"] - r) < 1e-9 for r in self.stream_ratios) and \
                (rec.get("stream", {}).get("rss_probe") != RSS_PROBE or
                 rec.get("stream", {}).get("record_version") != STREAM_RECORD)
        return stage not in rec

    def step(self, name: str, stage: str):
        """Do one stage of one run (name 'dense' or method-r<ratio>) unless its result is already there."""
        if stage in self.skip:
            return
        is_dense = name == "dense"
        rec = _read(self.run_path(name))
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
                new = self.prune_run(rec["method"], rec["ratio"])
                if "prune" in rec:  # measured again: evaluations stay valid only for the very same model
                    _check_same_model(name, rec["prune"], new)
                    new["superseded"] = {k: rec["prune"].get(k) for k in ("seconds", "peak_rss_mb", "wall_seconds")}
                    if not self.same_evaluations(name, rec, new):
                        for stage_result in ("ppl", "speed", "zeroshot", "eval_seconds"):
                            rec.pop(stage_result, None)  # a different model: everything is measured again
                if stage in self.redo:
                    new["redo_tag"] = self.redo_tag
                rec["prune"] = new
                rec.get("errors", {}).pop(stage, None)
                self._save(name, rec)
                return
            if stage == "stream":
                st = self.prune_run(rec["method"], rec["ratio"], stream=True)
                shutil.rmtree(self.model_dir(name + "-stream"), ignore_errors=True)
                st["identical_to_in_memory"] = st["weights_sha256"] == rec["prune"].get("weights_sha256")
                rec["stream"] = {k: st.get(k) for k in ("seconds", "wall_seconds", "peak_rss_mb", "rss_probe",
                                                        "weights_sha256", "identical_to_in_memory", "streaming",
                                                        "command")}
                rec["stream"]["record_version"] = STREAM_RECORD
                rec.get("errors", {}).pop(stage, None)
                self._save(name, rec)
                return
            dense, tok = self.dense()
            if is_dense:
                from .loading import count_params
                rec.setdefault("params", count_params(dense))
                model = dense
            else:
                model, tok = self.ensure_model(name, rec)
                rec["params"] = rec["prune"]["params_after"]
            t0 = time.perf_counter()
            _log(f"{stage} {name}", self.show)
            if stage in ("ppl", "full"):
                for key, r in self.eval_ppl(model, tok, full=stage == "full", have=rec.get("ppl", {})):
                    rec.setdefault("ppl", {})[key] = r
                    self._save(name, rec)  # each window length as it completes
            elif stage == "speed":
                from .evaluate.speed import relative_speed
                rec["speed"] = relative_speed(model, dense, tok, new_tokens=self.speed_tokens,
                                              repeats=self.speed_repeats)
                if stage in self.redo:
                    rec["speed"]["redo_tag"] = self.redo_tag
            elif stage == "zeroshot":
                calib = rec.get("prune", {}).get("calibration", {}).get("sha256", "")[:12]
                key = ((self.dense_cache_key or f"{self.model_spec}-dense-{self.dtype}") if is_dense else
                       f"compare-{self.model_spec}-{name}-{calib}-{self.dtype}")
                rec["zeroshot"] = self.eval_zeroshot(model, tok, key)
            rec.setdefault("eval_seconds", {})[stage] = round(time.perf_counter() - t0, 1)
            if not is_dense:
                del model
            rec.get("errors", {}).pop(stage, None)
            self._save(name, rec)
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the others; it is recorded
            msg = str(e) if isinstance(e, CompruneError) else f"{e.__class__.__name__}: {e}"
            _log(f"{stage} {name} failed: {msg}", True)
            rec.setdefault("errors", {})[stage] = msg
            self._save(name, rec)

    def plan(self) -> list[tuple[str, str]]:
        """(run, stage) in the order the work is done: the headline ratio first (prune, streamed prune, slice
        perplexity, speed), then the other ratios, then zero-shot at the headline ratio, then full-test-set perplexity."""
        first = [r for r in self.ratios if self.zeroshot_ratio is not None and abs(r - self.zeroshot_ratio) < 1e-9]
        rest = [r for r in self.ratios if r not in first]
        steps = [("dense", "ppl")]
        for r in first + rest:
            for m in self.methods:
                steps += [(run_name(m, r), s) for s in ("prune", "stream", "ppl", "speed")]
        if first:
            steps += [("dense", "zeroshot")] + [(run_name(m, r), "zeroshot") for r in first for m in self.methods]
        if self.full_ratio is not None and any(abs(r - self.full_ratio) < 1e-9 for r in self.ratios):
            steps += [("dense", "full")] + [(run_name(m, self.full_ratio), "full") for m in self.methods]
        return steps

    def finished(self, name: str) -> bool:
        """Every stage this run needs is done (its model directory may then go)."""
        rec = _read(self.run_path(name))
        return not any(n == name and self.needed(n, s, rec) for n, s in self.plan())

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        settings_path = self.out / "settings.json"
        old = _read(settings_path)
        if old and {k: old.get(k) for k in ("model", "calib", "nsamples", "seqlen", "seed", "dtype")} != \
                {k: self.settings()[k] for k in ("model", "calib", "nsamples", "seqlen", "seed", "dtype")}:
            raise CompruneError(f"{self.out} holds a comparison with other model/calibration settings: "
                                "use another --out (results of different calibrations must not be mixed)")
        _write(settings_path, {**old, **self.settings()})
        self.runtime_floor()
        for name, stage in self.plan():
            self.step(name, stage)
            if name != "dense" and not self.keep_models and self.finished(name):
                shutil.rmtree(self.model_dir(name), ignore_errors=True)
        return self.write_reports()

    def runtime_floor(self) -> dict:
        """Peak RSS of a process that imports comprune and builds the model's skeleton without weights: what
        every pruning process pays before its own work. Two floors: with transformers' model classes (their
        modeling code imported: an in-memory prune) and with comprune's plain-PyTorch modules (a streamed
        prune). Measured once per comparison, each in its own process."""
        path = self.out / "runtime_floor.json"
        rec = _read(path)
        if rec.get("rss_probe") == RSS_PROBE and "stream_peak_rss_mb" in rec:
            return rec
        from .stream import resolve_stream_source
        resolve_stream_source(self.model_spec)  # a first use builds the cached safetensors here, not in the probe
        code = ("import json, sys; from comprune.stream import build_skeleton, resolve_stream_source; "
                "from comprune.loading import resolve_dtype; from comprune.prune import peak_rss_mb; "
                "build_skeleton(resolve_stream_source(sys.argv[1]), resolve_dtype(sys.argv[2]), "
                "lite=sys.argv[3] == 'lite'); print(json.dumps({'peak_rss_mb': peak_rss_mb()}))")
        rec = {"rss_probe": RSS_PROBE}
        for modules, key in (("transformers", "peak_rss_mb"), ("lite", "stream_peak_rss_mb")):
            log = self.out / "logs" / f"runtime_floor-{modules}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            code_, stdout, peak = run_with_peak_rss([self.python, "-c", code, self.model_spec, self.dtype, modules],
                                                    subprocess.PIPE, log,
                                                    env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            try:
                own = json.loads(stdout.strip().splitlines()[-1])["peak_rss_mb"]
            except (ValueError, IndexError, KeyError):
                _log(f"runtime floor not measured (exit {code_}); see {log}", True)
                return {}
            rec[key] = max(own, peak or 0)
        rec["what"] = ("python + torch + transformers + comprune imported, model skeleton built on the meta device, "
                       "no weights, no data; peak_rss_mb with transformers' model classes (in-memory prunes), "
                       "stream_peak_rss_mb with comprune's plain-PyTorch modules (streamed prunes)")
        _write(path, rec)
        return rec

    # -------------------------------------------------------------------------------------------- reports
    def rows(self) -> list[dict]:
        rows = []
        names = ["dense"] + [run_name(m, r) for r in self.ratios for m in self.methods]
        for name in names:
            rec = _read(self.run_path(name))
            if not rec:
                continue
            p = rec.get("prune", {})
            ppl = rec.get("ppl", {})
            get = lambda key: ppl.get(key, {}).get("ppl")  # noqa: E731
            zs = rec.get("zeroshot", {})
            rows.append({
                "method": rec["method"], "ratio": rec["ratio"],
                "ratio_achieved": p.get("ratio_achieved", 0.0 if name == "dense" else None),
                "params": rec.get("params", p.get("params_after")),
                "layers": (f"{len(p['kept_layers'])}/{len(p['kept_layers']) + len(p['removed_layers'])}"
                           if p.get("kept_layers") is not None else None),
                **{f"ppl{s}": get(self.ppl_key(s, False)) for s in self.ppl_seqlens},
                **{f"ppl{s}_full": get(self.ppl_key(s, True)) for s in self.ppl_seqlens},
                "avg7": zs.get("average"), "zeroshot_tasks": {t: v.get(v.get("metric", "acc")) for t, v in zs.get("tasks", {}).items()} or None,
                "prune_seconds": p.get("seconds"), "prune_wall_seconds": p.get("wall_seconds"),
                "peak_rss_mb": p.get("peak_rss_mb") if p.get("rss_probe") == RSS_PROBE else None,
                "stream_seconds": rec.get("stream", {}).get("seconds"),
                "stream_peak_rss_mb": rec.get("stream", {}).get("peak_rss_mb"),
                "stream_identical": rec.get("stream", {}).get("identical_to_in_memory"),
                "speed_relative": rec.get("speed", {}).get("relative", 1.0 if name == "dense" else None),
                "tokens_per_second": rec.get("speed", {}).get("tokens_per_second"),
                "calibration_sha256": p.get("calibration", {}).get("sha256"),
                "errors": rec.get("errors") or None})
        return rows

    def write_reports(self) -> dict:
        rows = self.rows()
        shas = {r["calibration_sha256"] for r in rows if r["calibration_sha256"]}
        floors = _read(self.out / "runtime_floor.json")
        floor = floors.get("peak_rss_mb")
        result = {"settings": self.settings(), "calibration_sha256": sorted(shas), "rows": rows,
                  "calibration_identical": len(shas) <= 1, "runtime_floor_mb": floor,
                  "stream_runtime_floor_mb": floors.get("stream_peak_rss_mb")}
        _write(self.out / "results.json", result)
        (self.out / "results.md").write_text(markdown_table(rows, self.settings(), shas, floor) + "\n")
        try:
            plot(rows, self.out / "results.png", {**self.settings(), "runtime_floor_mb": floor})
        except ImportError:
            pass
        return result


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def markdown_table(rows: list[dict], settings: dict, shas=(), floor_mb: float | None = None) -> str:
    seqlens = settings["ppl_seqlens"]
    mt = settings["ppl_max_tokens"]
    head = ["method", "ratio (req → got)", "params (M)", "layers"]
    head += [f"PPL@{s} ({mt // 1024}k tok)" for s in seqlens] + [f"PPL@{s} full" for s in seqlens]
    head += ["7-task avg (%)", "prune s", "peak RSS (MB)", "streamed: s / peak RSS (MB)", "gen tok/s vs dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        ratio = "0" if r["method"] == "dense" else f"{r['ratio']:.2f} → {_f(r['ratio_achieved'], '{:.4f}')}"
        cells = [r["method"], ratio, _f(r["params"] / 1e6 if r["params"] else None, "{:.2f}"), r["layers"] or "-"]
        cells += [_f(r[f"ppl{s}"]) for s in seqlens] + [_f(r[f"ppl{s}_full"]) for s in seqlens]
        streamed = "-" if r.get("stream_peak_rss_mb") is None else \
            f"{r['stream_seconds']:.0f} / {r['stream_peak_rss_mb']:.0f}" + ("" if r["stream_identical"] else " (≠!)")
        cells += [_f(100 * r["avg7"] if r["avg7"] is not None else None), _f(r["prune_seconds"], "{:.0f}"),
                  _f(r["peak_rss_mb"], "{:.0f}"), streamed, _f(r["speed_relative"], "{:.2f}×")]
        if r.get("errors"):
            cells[0] += " (error: " + "; ".join(f"{k}" for k in r["errors"]) + ")"
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    note = (f"\nCalibration: {settings['calib']}, {settings['nsamples']} × {settings['seqlen']} tokens, seed "
            f"{settings['seed']}; sha256 " + (", ".join(s[:16] + "…" for s in sorted(shas)) or "-") +
            (" (identical for every method)" if len(shas) == 1 else " (DIFFERS between runs!)" if shas else "") +
            f". Zero-shot: {settings['zeroshot_tasks']}, subset {settings['zeroshot_subset']} per task, at ratio "
            f"{settings['zeroshot_ratio']}; full-test-set perplexity at ratio {settings['full_ratio']}. "
            "Peak RSS: the pruning process's own high-water mark (wait4's ru_maxrss through a small launcher, or its "
            "VmHWM if larger). Streamed: the same prune with "
            "`--stream` (one block in memory) in its own process; its weights equal the in-memory prune's "
            "(sha256) unless marked ≠.")
    if floor_mb:
        note += (f" Runtime floor: {floor_mb:.0f} MB is the peak RSS of a process that only imports comprune "
                 "(python, torch, transformers' modeling code) and builds the model's skeleton without weights; "
                 "every in-memory pruning process pays it before its own work (a streamed prune uses comprune's "
                 "plain-PyTorch modules instead of transformers' modeling code: a lower floor).")
    tasks = next((list(r["zeroshot_tasks"]) for r in rows if r.get("zeroshot_tasks")), None)
    if tasks:
        zs = [r for r in rows if r.get("zeroshot_tasks")]
        note += "\n\nZero-shot per task (%; acc_norm for hellaswag, arc_challenge, openbookqa, acc otherwise):\n\n"
        note += "| method | ratio | " + " | ".join(tasks) + " | average |\n|---|---:|" + "---:|" * (len(tasks) + 1)
        for r in zs:
            vals = [_f(100 * r["zeroshot_tasks"][t] if r["zeroshot_tasks"].get(t) is not None else None)
                    for t in tasks]
            note += f"\n| {r['method']} | {r['ratio']:.2f} | " + " | ".join(vals) + f" | {_f(100 * r['avg7'])} |"
    return "\n".join(lines) + "\n" + note


COLORS = {"dense": "black", "comp": "tab:red", "llm-pruner": "tab:blue", "flap": "tab:green",
          "layer-drop": "tab:purple", "wanda-sp": "tab:orange", "magnitude": "tab:gray"}


def plot(rows: list[dict], path: Path, settings: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = [m for m in settings["methods"] if any(r["method"] == m for r in rows)]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    s0 = settings["ppl_seqlens"][0]
    for m in methods:
        pts = sorted((r["ratio_achieved"], r[f"ppl{s0}"]) for r in rows
                     if r["method"] == m and r[f"ppl{s0}"] is not None and r["ratio_achieved"] is not None)
        if dense and dense[f"ppl{s0}"] is not None:
            pts = [(0.0, dense[f"ppl{s0}"])] + pts
        if pts:
            ax1.plot([100 * x for x, _ in pts], [y for _, y in pts], "o-", color=COLORS.get(m), label=m)
        if len(settings["ppl_seqlens"]) > 1:
            s1 = settings["ppl_seqlens"][1]
            pts = sorted((r["ratio_achieved"], r[f"ppl{s1}"]) for r in rows
                         if r["method"] == m and r[f"ppl{s1}"] is not None and r["ratio_achieved"] is not None)
            if dense and dense[f"ppl{s1}"] is not None:
                pts = [(0.0, dense[f"ppl{s1}"])] + pts
            if pts:
                ax1.plot([100 * x for x, _ in pts], [y for _, y in pts], "s--", color=COLORS.get(m), alpha=0.5)
    ax1.set_yscale("log")
    ax1.set_xlabel("parameters removed (%, achieved)")
    ax1.set_ylabel(f"WikiText-2 perplexity (solid @{s0}, dashed @{settings['ppl_seqlens'][-1]}; "
                   f"first {settings['ppl_max_tokens']} tokens)")
    ax1.set_title(f"Quality vs pruning ratio — {settings['model']}")
    ax1.grid(True, which="both", alpha=0.3)
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend()
    for m in methods:
        for key_s, key_m, stream in (("prune_seconds", "peak_rss_mb", False), ("stream_seconds", "stream_peak_rss_mb", True)):
            pts = [(r[key_s], r[key_m], r["ratio"]) for r in rows
                   if r["method"] == m and r.get(key_s) is not None and r.get(key_m) is not None]
            if not pts:
                continue
            ax2.scatter([p[0] for p in pts], [p[1] for p in pts], s=50, label=m + (" --stream" if stream else ""),
                        **({"facecolors": "none", "edgecolors": COLORS.get(m), "marker": "D"} if stream else
                           {"color": COLORS.get(m)}))
            for x, y, rr in pts:
                ax2.annotate(f"{100 * rr:.0f}%", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    floor = settings.get("runtime_floor_mb")
    if floor:
        ax2.axhline(floor, color="gray", ls=":", lw=1)
        ax2.annotate("runtime floor (imports + skeleton, no weights)", (0, floor), xycoords=("axes fraction", "data"),
                     textcoords="offset points", xytext=(4, -10), fontsize=8, color="gray")
    ax2.set_xlabel("pruning time (s, in its own process)")
    ax2.set_ylabel("pruning peak RSS (MB, the process's own high-water mark)")
    ax2.set_ylim(bottom=0)
    ax2.set_title("Pruning cost")
    ax2.grid(True, alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(model_spec="smollm2", ratios=(0.1, 0.2, 0.3), methods=DEFAULT_METHODS, out_dir=DEFAULT_OUT, **kw) -> dict:
    """Prune `model_spec` with every method at every ratio and evaluate them alike (see the module docstring).
    Returns the results dict also written to `<out_dir>/results.json` (+ results.md, results.png)."""
    return Comparison(model_spec, ratios, methods, out_dir, **kw).run()
