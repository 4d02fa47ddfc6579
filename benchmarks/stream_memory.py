"""Streaming prune memory: peak RSS of `comprune prune --stream` against the size of the model it prunes.

1. big:      a random Llama-architecture model (default 2.62 B parameters, 10.5 GB of float32 safetensors:
             56 blocks of hidden 3072, MLP 2048, 24 query / 8 KV heads, SmolLM2's 49152-token vocabulary,
             tied embeddings, one shard per block) is written shard by shard - never materialised - then
             pruned 20 % with COMP from disk in a child process whose address space is capped far below the
             model's size (`prlimit --as`, 2 GiB by default: the weights are 5x that). Its peak RSS (its VmHWM)
             is compared with the weights' size. The MLP is narrow on purpose: COMP's per-block workspace is
             a few f x f float64 matrices (f = MLP width) and its greedy selection is O(f^3) per block, so a
             narrow MLP keeps the run at a few minutes on 2 cores.
2. smollm2:  SmolLM2-135M (538 MB float32) pruned 20 % with and without --stream: peak RSS of both.

The calibration is small for the random model (4 x 128 c4 tokens); SmolLM2 uses the default 128 x 128 in the
recorded results. The random model is deleted afterwards (its weights are noise: this only measures memory).

    .venv/bin/python benchmarks/stream_memory.py --parts big
    .venv/bin/python benchmarks/stream_memory.py --parts smollm2 --nsamples 128       # or smollm2-stream
    .venv/bin/python benchmarks/stream_memory.py --layers 24 --as-limit-gb 3

Writes (merges into) benchmarks/results/stream_memory.json and rewrites .md with the commands.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from comprune.loading import embedded_cached_dir  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def write_random_llama(out: Path, layers: int, hidden: int, inter: int, heads: int, kv_heads: int,
                       tokenizer_dir: Path, seed: int = 0) -> dict:
    """A random Llama model as safetensors, one shard per block (+ one for embeddings/norm): at most one
    block's tensors are in memory at a time. Uses `tokenizer_dir`'s tokenizer (and its vocabulary size)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    head_dim = hidden // heads
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
                      max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg.dtype = "float32"
    cfg.architectures = ["LlamaForCausalLM"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    weight_map, total, params = {}, 0, 0

    def shard(name, tensors):
        nonlocal total, params
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
            params += v.numel()

    std = 0.02
    shard("model-rest.safetensors", {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * std,
        "model.norm.weight": torch.ones(hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        # per-block output scale, so block influence differs between blocks as in trained models
        s = float(0.5 + torch.rand(1, generator=g)) / (2 * layers) ** 0.5
        shard(f"model-layer-{i:05d}.safetensors", {
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": torch.randn(heads * head_dim, hidden, generator=g) * std,
            p + "self_attn.k_proj.weight": torch.randn(kv_heads * head_dim, hidden, generator=g) * std,
            p + "self_attn.v_proj.weight": torch.randn(kv_heads * head_dim, hidden, generator=g) * std,
            p + "self_attn.o_proj.weight": torch.randn(hidden, heads * head_dim, generator=g) * std * s,
            p + "mlp.gate_proj.weight": torch.randn(inter, hidden, generator=g) * std,
            p + "mlp.up_proj.weight": torch.randn(inter, hidden, generator=g) * std,
            p + "mlp.down_proj.weight": torch.randn(hidden, inter, generator=g) * std * s})
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"params": params, "weights_bytes": total, "layers": layers, "hidden": hidden, "intermediate": inter,
            "heads": heads, "kv_heads": kv_heads, "vocab": vocab, "tied_embeddings": True}


def run_measured(cmd: list[str], as_limit: int | None = None, log: Path | None = None) -> dict:
    """Run `cmd` (optionally under `prlimit --as`), returning its exit code, wall time and peak RSS: the child's
    VmHWM polled from /proc every 0.5 s (its own address space's high-water mark, monotone, so only the last
    half second could be missed; the child's self-reported VmHWM in its JSON closes that gap). wait4's ru_maxrss
    is kept only as an upper bound: Linux carries it across exec, so it can be the launcher's peak."""
    if as_limit:
        cmd = ["prlimit", f"--as={as_limit}", "--", *cmd]
    t0 = time.perf_counter()
    f = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    seen = {"VmHWM": 0, "VmPeak": 0}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key = line.split(":")[0]
                    if key in seen:
                        seen[key] = max(seen[key], int(line.split()[1]) * 1024)
            except (OSError, ValueError, IndexError):
                pass
            stop.wait(0.5)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    _, status, ru = os.wait4(proc.pid, 0)
    stop.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        f.close()
    return {"returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_bytes": seen["VmHWM"], "ru_maxrss_bytes": ru.ru_maxrss * 1024, "vm_hwm_bytes": seen["VmHWM"], "vm_peak_bytes": seen["VmPeak"],
            "as_limit_bytes": as_limit, "command": shlex.join(cmd)}


def prune_cmd(spec, out, stream: bool, nsamples: int, seqlen: int, dtype: str = "auto") -> list[str]:
    return [sys.executable, "-m", "comprune.cli", "prune", str(spec), "--out", str(out), "--force", "--ratio", "0.2",
            "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--calib", "c4", "--json"] + \
        (["--stream"] if stream else []) + (["--dtype", dtype] if dtype != "auto" else [])


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def gb(n):
    return round(n / 1e9, 3) if n else None


def manifest(out: Path) -> dict:
    p = out / "pruning.json"
    if not p.is_file():
        return {}
    m = json.loads(p.read_text())
    return {"ratio_achieved": m["ratio_achieved"], "params_before": m["params_before"], "params_after": m["params_after"],
            "removed_layers": m["removed_layers"], "mlp_widths": sorted(set(m["mlp_widths"])),
            "self_reported_peak_rss_mb": m["peak_rss_mb"], "streaming": m.get("streaming")}


def merge_manifest(r: dict, m: dict):
    """Add the child's manifest to its measurement; its self-reported VmHWM covers the last unpolled moments."""
    r.update(m)
    if m.get("self_reported_peak_rss_mb"):
        r["peak_rss_bytes"] = max(r["peak_rss_bytes"], int(m["self_reported_peak_rss_mb"] * 2**20))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="big,smollm2")
    ap.add_argument("--work", default=str(ROOT / "out" / "stream_memory"), help="scratch directory (deleted)")
    ap.add_argument("--layers", type=int, default=56)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--as-limit-gb", type=float, default=2.0, help="address-space cap of the big streaming run (GiB)")
    ap.add_argument("--keep", action="store_true", help="keep the random model and outputs")
    ap.add_argument("--reuse", action="store_true", help="reuse a random model left by --keep (or a killed run)")
    ap.add_argument("--dtype", default="auto", help="SmolLM2 parts: the prune's --dtype (a row of its own unless auto)")
    args = ap.parse_args()
    parts = args.parts.split(",")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from comprune.precision import cpu_name
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                           "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                           "cpu": cpu_name()}}
    command = shlex.join(["python", "benchmarks/stream_memory.py", *sys.argv[1:]])
    calibration = {"source": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen}
    smol = embedded_cached_dir("smollm2")
    try:
        if "big" in parts:
            src = work / "random-llama"
            t0 = time.perf_counter()
            if args.reuse and (src / "model.safetensors.index.json").is_file():
                c = json.loads((src / "config.json").read_text())
                total = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
                info = {"params": total // 4, "weights_bytes": total, "layers": c["num_hidden_layers"],
                        "hidden": c["hidden_size"], "intermediate": c["intermediate_size"],
                        "heads": c["num_attention_heads"], "kv_heads": c["num_key_value_heads"],
                        "vocab": c["vocab_size"], "tied_embeddings": c["tie_word_embeddings"]}
            else:
                info = write_random_llama(src, args.layers, args.hidden, args.intermediate, args.heads,
                                          args.kv_heads, smol)
                info["write_seconds"] = round(time.perf_counter() - t0, 1)
            limit = int(args.as_limit_gb * 2**30)
            print(f"[big] {info['params'] / 1e9:.2f} B params, {info['weights_bytes'] / 1e9:.2f} GB; pruning under "
                  f"prlimit --as={limit}", flush=True)
            out = work / "random-llama-comp20"
            r = run_measured(prune_cmd(src, out, True, args.nsamples, args.seqlen), limit, work / "big.log")
            merge_manifest(r, manifest(out))
            r["output_bytes"] = dir_bytes(out) if out.is_dir() else None
            results["big"] = {"model": info, "stream": r, "command": command, "calibration": calibration,
                              "peak_rss_over_weights": round(r["peak_rss_bytes"] / info["weights_bytes"], 3)}
            print(json.dumps(results["big"], indent=1), flush=True)
            if not args.keep:
                shutil.rmtree(src, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
            write(results)
        modes = [m for m in ("stream", "in_memory") if "smollm2" in parts or f"smollm2-{m}" in parts]
        if modes:
            path = RESULTS / "stream_memory.json"
            old = json.loads(path.read_text()).get("smollm2", {}) if path.is_file() else {}
            sm = {**old, "weights_bytes": dir_bytes(smol), "command": command, "calibration": calibration}
            if old.get("calibration", calibration) != calibration:
                sm = {k: v for k, v in sm.items() if k not in ("stream", "in_memory")}
            for mode in modes:
                out = work / f"smollm2-comp20-{mode}"
                r = run_measured(prune_cmd("smollm2", out, mode == "stream", args.nsamples, args.seqlen, args.dtype),
                                 None, work / f"smollm2-{mode}.log")
                merge_manifest(r, manifest(out))
                r["benchmark_command"] = command  # the parts may be measured by separate invocations
                r["dtype"], r["host"] = args.dtype, cpu_name()
                sm[mode if args.dtype == "auto" else f"{mode}_{args.dtype}"] = r
                print(mode, json.dumps(r, indent=1), flush=True)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
            results["smollm2"] = sm
            write(results)
    finally:
        if not args.keep and "big" in parts:  # (never while another invocation may be using it)
            shutil.rmtree(work / "random-llama", ignore_errors=True)
            shutil.rmtree(work / "random-llama.tmp", ignore_errors=True)


def _modes(record: dict) -> list[str]:
    """The measured runs of a record: stream, in_memory, and the ones with an explicit --dtype."""
    return [k for k, v in record.items() if isinstance(v, dict) and "peak_rss_bytes" in v]


def _r4(x):
    return None if x is None else round(x, 4)


def _ratio(s, weights):
    return round(s["peak_rss_bytes"] / weights, 2)


def _setup(s):
    """Peak RSS before the first block was read (imports, tokenizer, calibration, embeddings; streaming only)."""
    st = s.get("streaming") or {}
    return round(st["peak_rss_mb_setup"] * 2**20 / 1e9, 3) if "peak_rss_mb_setup" in st else None


def write(new: dict):
    """Merge into the results file (re-read now: the parts may run as separate processes)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "stream_memory.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(new)
    path.write_text(json.dumps(results, indent=2) + "\n")
    rows = []
    if "big" in results:
        b = results["big"]
        m, s = b["model"], b["stream"]
        c = b["calibration"]
        rows.append(("random Llama", f"{m['params'] / 1e9:.2f} B", gb(m["weights_bytes"]), "stream",
                     f"{c['nsamples']} x {c['seqlen']}", gb(s["as_limit_bytes"]), gb(s["peak_rss_bytes"]),
                     _ratio(s, m["weights_bytes"]), _setup(s), s["seconds"], s["returncode"],
                     _r4(s.get("ratio_achieved"))))
    if "smollm2" in results:
        sm = results["smollm2"]
        for mode in _modes(sm):
            s = sm.get(mode)
            if s:
                c = sm["calibration"]
                label = mode.replace("_memory", "-memory").replace("_", ", --dtype ")
                rows.append(("SmolLM2-135M", f"{(s.get('params_before') or 0) / 1e6:.0f} M", gb(sm["weights_bytes"]),
                             label, f"{c['nsamples']} x {c['seqlen']}", gb(s["as_limit_bytes"]),
                             gb(s["peak_rss_bytes"]), _ratio(s, sm["weights_bytes"]), _setup(s), s["seconds"],
                             s["returncode"], _r4(s.get("ratio_achieved"))))
    head = ("model", "params", "weights GB (f32)", "mode", "calibration", "address-space cap GB", "peak RSS GB",
            "peak RSS / weights", "peak RSS before the walk GB", "seconds", "exit", "ratio achieved")
    lines = ["# Streaming prune: peak memory vs model size", "",
             f"COMP 20 %, c4 calibration, {results['machine']['cpus']} CPU cores (shared with other jobs: times are "
             f"noisy); host of the latest rows: {results['machine'].get('cpu', 'not recorded')}. A row without "
             "--dtype ran in the auto precision of its host.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("-" if v is None else str(v) for v in r) + " |" for r in rows]
    lines += ["", "Peak RSS is the pruning process's own VmHWM (its resident high-water mark, file pages of any "
              "mmaps included while mapped), the larger of the value polled from /proc and the one it reports itself. "
              "Not wait4's ru_maxrss, which Linux carries across exec from the launcher. The address-space cap (`prlimit --as`) "
              "bounds virtual memory, which is always above RSS, so the run could not have held the model.", "",
              "Commands:", "", "```"]
    for key in ("big", "smollm2"):
        if key in results:
            if not any((results[key].get(m) or {}).get("benchmark_command") for m in ("stream", "in_memory")):
                lines.append(results[key]["command"])
            for mode in _modes(results[key]):
                s = results[key].get(mode)
                if s:
                    if s.get("benchmark_command"):
                        lines.append(s["benchmark_command"])
                    lines.append(s["command"].replace(str(ROOT) + "/", "").replace(sys.executable, "python"))
    lines += ["```", ""]
    (RESULTS / "stream_memory.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
