"""Shared plumbing for the official-code baselines (benchmarks/official/*.py, run with comprune's Python).

Each runner (1) builds the official code's own virtualenv outside the repo (torch==2.13.0 first, then the rest
with torch pinned, so pip never swaps in another torch), (2) runs the untouched official code through a shim in
shims/ (offline data, CPU, and "save the pruned model" in place of the repo's own evaluation), timing it and
reading its peak RSS, then (3) loads the pruned safetensors back into comprune and measures perplexity with
comprune's evaluator on the slice the harness rows use, so official and harness numbers differ only in the
pruning. Results: benchmarks/results/official/<method>.json.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIMS = HERE / "shims"
RESULTS = HERE.parent / "results" / "official"
VENVS = Path(os.environ.get("COMPRUNE_OFFICIAL_VENVS", "/work/venvs"))
SRC = Path(os.environ.get("COMPRUNE_OFFICIAL_SRC", "/work/official-src"))
TORCH = "torch==2.13.0"
SLICE = {"dataset": "wikitext2", "max_tokens": 32768, "seqlens": [128, 2048]}


def log(msg: str):
    print(f"[official {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_venv(name: str, requirements: list[str], python: str = "python3.11") -> Path:
    """A virtualenv at VENVS/name with torch 2.13.0 (CPU wheel) and `requirements`; reused when its
    requirements file matches."""
    venv = VENVS / name
    stamp = venv / "comprune-requirements.txt"
    want = "\n".join([TORCH, *requirements]) + "\n"
    if stamp.is_file() and stamp.read_text() == want:
        return venv
    if not (venv / "bin" / "python").exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH], check=True)
    frozen = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze"], check=True,
                            capture_output=True, text=True).stdout
    constraint = venv / "torch-constraint.txt"
    constraint.write_text("".join(line + "\n" for line in frozen.splitlines() if line.startswith("torch==")))
    subprocess.run(pip + ["-c", str(constraint), *requirements], check=True)
    stamp.write_text(want)
    return venv


def venv_versions(venv: Path) -> dict:
    code = "import json,torch,transformers;print(json.dumps({'torch':torch.__version__,'transformers':transformers.__version__}))"
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def base_model_dir() -> Path:
    """comprune's SmolLM2 (safetensors, float32) in a directory transformers 4.x reads: rope_theta instead of
    rope_parameters, a stock fast-tokenizer class. The weights are the ones every harness row prunes."""
    from comprune.loading import embedded_cached_dir
    src = embedded_cached_dir("smollm2")
    dst = VENVS / "base" / src.name
    if (dst / "config.json").is_file():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg["transformers_version"] = "4.43.4"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tok = json.loads((src / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok.pop("backend", None)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")
    tj = json.loads((src / "tokenizer.json").read_text())
    merges = tj.get("model", {}).get("merges") or []
    if merges and isinstance(merges[0], list):  # tokenizers < 0.20 (transformers 4.4x) reads "a b" merges only
        tj["model"]["merges"] = [" ".join(m) for m in merges]
    (tmp / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    for f in ("model.safetensors", "generation_config.json"):
        if (src / f).is_file():
            shutil.copyfile(src / f, tmp / f)
    os.replace(tmp, dst)
    return dst


def checkout(repo: str) -> tuple[Path, str | None]:
    """The official code: SRC/<owner>+<name> (a `git archive` of the fetched repository; see README.md).
    The commit is read from <checkout>/.official_commit when present."""
    path = SRC / repo.replace("/", "+")
    if not path.is_dir():
        sys.exit(f"official code for {repo} not found at {path}: extract it there (see benchmarks/official/README.md)")
    stamp = path / ".official_commit"
    return path, (stamp.read_text().strip() if stamp.is_file() else None)


def run_measured(cmd: list[str], cwd: Path, log_path: Path, threads: int) -> dict:
    """Run `cmd` under nice 19 with `threads` BLAS threads; wall time and the child's peak RSS (wait4)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    cwd.mkdir(parents=True, exist_ok=True)
    log(f"running: {' '.join(cmd)}  (log {log_path})")
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        proc = subprocess.Popen(["nice", "-n", "19", *cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        sys.exit(f"official run failed (exit {rc}); last log lines:\n{tail}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "threads": threads}


def load_pruned(out_dir: Path):
    """The official pruned model (pruned.safetensors + shapes.json) as a comprune/transformers model: comprune's
    SmolLM2 with its removed layers dropped and every linear resized to the saved shapes, then the saved tensors
    loaded strictly (only the tied lm_head may be absent)."""
    import torch
    from safetensors.torch import load_file

    import comprune
    from comprune.models.adapters import get_adapter
    from comprune.surgery import _set_head_counts, drop_layers, finalize_config

    meta = json.loads((out_dir / "shapes.json").read_text())
    sd = load_file(str(out_dir / "pruned.safetensors"))
    model, tok = comprune.load("smollm2")
    adapter = get_adapter(model)
    if meta.get("removed_layers"):
        drop_layers(model, adapter, meta["removed_layers"])
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or f"{name}.weight" not in sd:
                continue
            w = sd[f"{name}.weight"]
            mod.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
            mod.out_features, mod.in_features = w.shape
            b = sd.get(f"{name}.bias")
            mod.bias = None if b is None else torch.nn.Parameter(b.clone(), requires_grad=False)
        for layer in adapter.layers(model):
            attn = adapter.attention(layer)
            q, k, _, _ = adapter.attention_linears(layer)
            hd = int(attn.head_dim)
            _set_head_counts(attn, q.out_features // hd, k.out_features // hd)
        finalize_config(model, adapter)
        missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        sys.exit(f"pruned checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    if "probe_logits" in meta:  # the official process's logits on a fixed input: the load must reproduce them
        from shims.offline import PROBE
        with torch.no_grad():
            got = model(torch.tensor([PROBE])).logits[0, -1, :8].double()
        want = torch.tensor(meta["probe_logits"], dtype=torch.float64)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            sys.exit(f"the loaded model's probe logits {got.tolist()} differ from the official run's {want.tolist()}")
        meta["probe_check"] = "passed"
    return model, tok, meta


def evaluate(model, tok) -> dict:
    import comprune
    out = {}
    for seqlen in SLICE["seqlens"]:
        r = comprune.perplexity(model, tok, SLICE["dataset"], seqlen=seqlen, max_tokens=SLICE["max_tokens"])
        out[f"ppl_{seqlen}"] = round(r["ppl"], 3)
        out[f"eval_{seqlen}"] = {k: r[k] for k in ("windows", "tokens", "seconds", "dtype")}
        log(f"ppl@{seqlen} = {r['ppl']:.3f}")
    return out


def machine() -> dict:
    import torch
    import transformers
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_1min": round(os.getloadavg()[0], 2), "eval_torch": torch.__version__,
            "eval_transformers": transformers.__version__, "eval_threads": torch.get_num_threads(),
            "precision": "float32"}


def dense_params() -> int:
    import comprune
    model, _ = comprune.load("smollm2")
    return comprune.count_params(model)


def write_result(method: str, result: dict):
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{method}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    log(f"wrote {path}")


def finish(method: str, repo: str, commit: str | None, recipe: list[str], command: str, venv: Path, run: dict,
           out_dir: Path, notes: list[str], threads: int):
    """Evaluate the pruned model in comprune's environment and write the JSON row."""
    import torch
    torch.set_num_threads(threads)
    model, tok, meta = load_pruned(out_dir)
    import comprune
    before = dense_params()
    after = comprune.count_params(model)
    result = {"method": method, "kind": "official", "source": {"repo": repo, "commit": commit},
              "command": command, "official_recipe": recipe, "params_before": before, "params_after": after,
              "params_removed_pct": round(100 * (1 - after / before), 2), "official_param_count": meta["params"],
              "removed_layers": meta.get("removed_layers", []), **{k: v for k, v in meta.items() if k in ("layer_scores", "probe_check")},
              "prune": run, "official_env": venv_versions(venv), "slice": SLICE, "machine": machine(), "notes": notes}
    result.update(evaluate(model, tok))
    write_result(method, result)
    return result
