"""What a comparison measures in processes of their own: each prune (its seconds and peak RSS, through a small
launcher) and the runtime floor (imports + model skeleton, no weights)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..config import PRESETS
from .stages import split_row, stage_flags
from ..errors import CompruneError
from ..io import weights_digest
from ..stream import resolve_stream_source
from .records import RSS_PROBE, log, read_json, run_name, write_json

# Runs a command as a grandchild and prints its peak RSS (KiB) from wait4 as the last stderr line. Through
# this small process the prune's ru_maxrss starts from the launcher's ~10 MB, not from the comparison
# driver's GBs (Linux carries ru_maxrss across exec), and wait4 sees the kernel's final high-water mark,
# which can exceed the VmHWM a process reads of itself while running.
LAUNCHER = ("import os, sys\n"
             "pid = os.fork()\n"
             "if pid == 0:\n"
             "    os.execvp(sys.argv[1], sys.argv[1:])\n"
             "_, status, ru = os.wait4(pid, 0)\n"
             "print(f'comprune-peak-rss-kib {ru.ru_maxrss}', file=sys.stderr, flush=True)\n"
             "sys.exit(os.waitstatus_to_exitcode(status) % 256)\n")


def run_with_peak_rss(cmd: list[str], stdout, stderr_path: Path, env=None) -> tuple[int, str, float | None]:
    """(exit code, stdout text, peak RSS in MiB of the command's own process or None)."""
    with open(stderr_path, "w") as err:
        r = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], stdout=stdout, stderr=err, text=True, env=env)
    peak = None
    for line in reversed(stderr_path.read_text().splitlines()):
        if line.startswith("comprune-peak-rss-kib "):
            peak = int(line.split()[1]) / 1024
            break
    return r.returncode, r.stdout, peak


def check_same_model(name: str, old: dict, new: dict):
    """A re-pruned run must give the model its evaluations were made on (pruning is deterministic)."""
    keys = ["params_after", "removed_layers", "mlp_widths"] + (["weights_sha256"] if old.get("weights_sha256") else [])
    diff = [k for k in keys if old.get(k) != new.get(k)]
    if diff:
        raise CompruneError(f"re-pruning {name} gave a different model ({', '.join(diff)} changed): its evaluations "
                            f"no longer apply; delete its runs/{name}.json to evaluate the new model")


def prune_command(cmp, method: str, ratio: float, out: Path, stream: bool = False) -> list[str]:
    """The `comprune prune` command line of one run (a fresh process each)."""
    # a preset runs as `--preset NAME` (its own method and knobs), a method as `--method NAME` with its defaults
    base = split_row(method)[0]  # a row with recovery stages: its method's prune, then the stages' flags
    how = ["--preset", base] if base in PRESETS else ["--method", base]
    how += stage_flags(method)
    # --nproc N: a torchrun group of N processes on this host (comprune.distributed), one thread each
    group = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cmp.nproc}"] if cmp.nproc > 1 else []
    cmd = [cmp.python, *group, "-m", "comprune.cli", "prune", cmp.model_spec, *how, "--ratio", str(ratio),
           "--calib", cmp.calib, "--nsamples", str(cmp.nsamples), "--seqlen", str(cmp.seqlen),
           "--seed", str(cmp.seed), "--dtype", cmp.dtype, "--out", str(out), "--force", "--json"]
    if cmp.data_dir:
        cmd += ["--data-dir", str(cmp.data_dir)]
    for k, v in cmp.prune_args.get(method, {}).items():
        cmd += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    cmd += cmp.load_flags  # --trust-remote-code / --allow-pickle, as given to compare
    if stream:
        cmd += ["--stream"]
    return cmd


def prune_run(cmp, method: str, ratio: float, stream: bool = False) -> dict:
    """`cmp`: the Comparison (settings and paths). Prune one run in its own process (`comprune prune ... --json`, `--stream` with `stream`): its manifest's
    numbers, wall seconds, the peak RSS of the larger of wait4 and its own VmHWM, and the weights' digest."""
    name = run_name(method, ratio)
    out = cmp.model_dir(name + ("-stream" if stream else ""))
    log_path = cmp.out / "logs" / f"{name}.prune{'-stream' if stream else ''}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = prune_command(cmp, method, ratio, out, stream)
    log(f"prune {name}{' (streamed)' if stream else ''}: {' '.join(cmd[1:])}", cmp.show)
    t0 = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if cmp.nproc > 1:  # the host's cores shared by the ranks
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cmp.nproc)))
    code, stdout, peak = run_with_peak_rss(cmd, subprocess.PIPE, log_path, env=env)
    wall = time.perf_counter() - t0
    if code != 0:
        tail = log_path.read_text().strip().splitlines()[-3:]
        raise CompruneError(f"pruning {name} failed (exit {code}): {' | '.join(tail)}; log: {log_path}")
    rep = json.loads(stdout)
    keep = ("method", "ratio_requested", "ratio_achieved", "params_before", "params_after", "removed_layers",
            "kept_layers", "mlp_widths", "seconds", "peak_rss_mb", "calibration", "budget", "config", "details",
            "versions", "precision")
    rec = {k: rep.get(k) for k in keep}
    rec["wall_seconds"] = round(wall, 2)
    if rep.get("distributed"):
        rec["distributed"] = rep["distributed"]
    rec["command"] = " ".join(["python"] + cmd[1:])
    rec["rss_probe"] = RSS_PROBE
    rec["self_reported_peak_rss_mb"] = rec.get("peak_rss_mb")
    if peak is not None:  # the larger of the two: the process's own VmHWM at its end, wait4's ru_maxrss
        rec["peak_rss_mb"] = max(peak, rec.get("peak_rss_mb") or 0)
    rec["weights_sha256"] = weights_digest(out)
    man = read_json(out / "pruning.json")
    if stream:
        rec["streaming"] = man.get("streaming")
    rec["attention_heads"] = [b.get("heads") for _, b in sorted(man.get("blocks", {}).items(),
                                                                 key=lambda kv: int(kv[0]))]
    return rec


def runtime_floor(out: Path, model_spec: str, dtype: str, python: str, trust_remote_code: bool = False) -> dict:
    """Peak RSS of a process that imports comprune and builds the model's skeleton without weights: what
    every pruning process pays before its own work. Two floors: with transformers' model classes (their
    modeling code imported: an in-memory prune) and with comprune's plain-PyTorch modules (a streamed
    prune). Measured once per comparison, each in its own process."""
    path = out / "runtime_floor.json"
    rec = read_json(path)
    if rec.get("rss_probe") == RSS_PROBE and "stream_peak_rss_mb" in rec:
        return rec
    resolve_stream_source(model_spec)  # a first use builds the cached safetensors here, not in the probe
    code = ("import json, sys; from comprune.skeleton import build_skeleton; "
            "from comprune.stream import resolve_stream_source; from comprune.devices import resolve_dtype; "
            "from comprune.memory import peak_rss_mb; "
            "build_skeleton(resolve_stream_source(sys.argv[1]), resolve_dtype(sys.argv[2]), "
            "lite=sys.argv[3] == 'lite', trust_remote_code=sys.argv[4] == 'trust'); "
            "print(json.dumps({'peak_rss_mb': peak_rss_mb()}))")
    rec = {"rss_probe": RSS_PROBE}
    for modules, key in (("transformers", "peak_rss_mb"), ("lite", "stream_peak_rss_mb")):
        log_path = out / "logs" / f"runtime_floor-{modules}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        code_, stdout, peak = run_with_peak_rss([python, "-c", code, model_spec, dtype, modules,
                                                 "trust" if trust_remote_code else "no"],
                                                subprocess.PIPE, log_path,
                                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        try:
            own = json.loads(stdout.strip().splitlines()[-1])["peak_rss_mb"]
        except (ValueError, IndexError, KeyError):
            log(f"runtime floor not measured (exit {code_}); see {log_path}", True)
            return {}
        rec[key] = max(own, peak or 0)
    rec["what"] = ("python + torch + transformers + comprune imported, model skeleton built on the meta device, "
                   "no weights, no data; peak_rss_mb with transformers' model classes (in-memory prunes), "
                   "stream_peak_rss_mb with comprune's plain-PyTorch modules (streamed prunes)")
    write_json(path, rec)
    return rec
