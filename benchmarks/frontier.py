"""The frontier of pruning against quantization alone: quality, bytes and llama.cpp speed of GGUF files.

Points, for one model: the original file it came from (the embedded GGUF), the dense model at every type, and
pruned models (`--pruned DIR...`, or `--prune RATIO...` to prune here) at {q8_0, q6_k, q5_k_m, q4_k_m, q3_k_m}.
Per point:
- file bytes;
- perplexity of the quantized weights themselves: the GGUF dequantized back into the model
  (export.gguf_read.load_dequantized) and scored by comprune's evaluator (WikiText-2 test, --max-tokens,
  PPL@--seqlen), checked against llama.cpp's own next-token log-probs on a few --check windows;
- llama.cpp prompt and generation tokens/s, alternated run by run with the dense Q4_K_M file (the reference of
  every point's `gen_rel`), and llama.cpp's peak RSS (a child process that loads the file and generates).
The Pareto front (lower perplexity against fewer bytes, and against faster generation) is marked.

    python benchmarks/frontier.py --model smollm2 --pruned /work/prunes/smollm2-comp-0.20 --max-tokens 32768

Writes OUT.json after every point (a rerun skips the points it holds), then OUT.md and OUT.png
(default OUT: benchmarks/results/frontier_MODEL).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import comprune  # noqa: E402
from comprune.data import load_ids  # noqa: E402
from comprune.evaluate.perplexity import perplexity  # noqa: E402
from comprune.export.gguf import export_gguf  # noqa: E402
from comprune.export.gguf_read import load_dequantized  # noqa: E402
from comprune.export.llamacpp import llamacpp_server, next_token_logprobs, relative_llamacpp_speed  # noqa: E402
from comprune.loading import EMBEDDED, embedded_gguf_path  # noqa: E402
from comprune.precision import cpu_name  # noqa: E402
from comprune.stream import resolve_stream_source  # noqa: E402

DENSE_TYPES = ["f16", "q8_0", "q6_k", "q5_k_m", "q5_1", "q5_0", "q4_k_m", "q4_1", "q4_0", "q3_k_m", "q2_k"]
PRUNED_TYPES = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m"]
REFERENCE = "q4_k_m"  # every speed is measured alternately with the dense model at this type

# VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at its parent's (this benchmark's) high-water mark
HWM = "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
RSS_CHILD = """
import sys, xllamacpp
p = xllamacpp.CommonParams(); p.model.path = sys.argv[1]; p.n_ctx = 512; p.n_parallel = 1; p.verbosity = -1
p.cpuparams.n_threads = p.cpuparams_batch.n_threads = int(sys.argv[2])
s = xllamacpp.Server(p)
s.handle_completions({"prompt": list(range(10, 138)), "n_predict": 32, "temperature": 0, "ignore_eos": True})
""" + HWM


def llamacpp_peak_rss_mb(path: Path, threads: int) -> dict:
    """Peak RSS (VmHWM) of a process that loads the file in llama.cpp and generates, and of one that imports
    xllamacpp only."""
    def run(code, *args):
        out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-500:])
        return int(out.stdout.strip().splitlines()[-1]) / 1024
    base = run("import xllamacpp\n" + HWM)
    return {"peak_rss_mb": round(run(RSS_CHILD, path, threads), 1), "import_rss_mb": round(base, 1),
            "rss_source": "VmHWM"}


def llamacpp_check(model, gguf: Path, ids: torch.Tensor, windows: int, length: int = 256, top: int = 20) -> dict:
    """llama.cpp's next-token log-probs against the dequantized model's, at the end of a few windows: the largest
    difference over llama.cpp's top tokens, and whether the top token agrees."""
    server = llamacpp_server(gguf, n_ctx=length + 16, threads=torch.get_num_threads())
    worst, agree = 0.0, 0
    step = max(1, (ids.numel() - length) // max(windows, 1))
    for w in range(windows):
        prompt = ids[w * step: w * step + length].tolist()
        got = next_token_logprobs(server, prompt, top)
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
        worst = max(worst, max(abs(ref[i].item() - lp) for i, lp in got.items()))
        agree += int(max(got, key=got.get) == int(ref.argmax()))
    del server
    return {"windows": windows, "tokens": length, "max_abs_dlogprob_top": round(worst, 4), "top1_agree": agree}


def describe_dir(d: Path) -> tuple[str, float]:
    m = json.loads((d / "pruning.json").read_text())
    cfg = m.get("config", {})
    method = "comp-search" if cfg.get("width_allocation") == "search" else m.get("method", "pruned")
    method += "".join(f"+{s.get('stage', '?')}" for s in m.get("stages") or [])  # recovery stages that ran
    return method, float(m.get("ratio_requested") or cfg.get("ratio") or m.get("ratio_achieved"))


def pareto(points: list[dict], key: str, higher_better: bool) -> set[str]:
    """Names of the points no other point beats on both perplexity and `key`."""
    ok = [p for p in points if p.get("ppl") is not None and p.get(key) is not None]
    front = set()
    for p in ok:
        sign = -1 if higher_better else 1
        if not any(q is not p and q["ppl"] <= p["ppl"] and sign * q[key] <= sign * p[key]
                   and (q["ppl"] < p["ppl"] or sign * q[key] < sign * p[key]) for q in ok):
            front.add(p["name"])
    return front


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--pruned", nargs="*", type=Path, default=[], help="pruned model directories (pruning.json)")
    ap.add_argument("--prune", nargs="*", type=float, default=[], help="prune the model here at these ratios")
    ap.add_argument("--preset", default=None, help="with --prune: e.g. comp-search")
    ap.add_argument("--dense-types", nargs="*", default=DENSE_TYPES)
    ap.add_argument("--pruned-types", nargs="*", default=PRUNED_TYPES)
    ap.add_argument("--no-original", action="store_true", help="leave out the original GGUF file")
    ap.add_argument("--pad256", action="store_true", help="also pruned K-quant files padded to whole 256-blocks")
    ap.add_argument("--imatrix", action="store_true", help="quantize with an importance matrix (calibration windows)")
    ap.add_argument("--dataset", default="wikitext2", help="perplexity data (wikitext2 = its test split)")
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--check", type=int, default=3, help="windows checked against llama.cpp's own logits (0: none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="where GGUF files go (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.out or ROOT / "benchmarks" / "results" / f"frontier_{args.model}"
    out.parent.mkdir(parents=True, exist_ok=True)
    js = out.with_suffix(".json")
    data = json.loads(js.read_text()) if js.is_file() else {}
    if data.get("model") not in (None, args.model):
        raise SystemExit(f"{js} holds model {data.get('model')}, not {args.model}: pass another --out")
    data.update({"model": args.model, "dataset": args.dataset, "max_tokens": args.max_tokens, "seqlen": args.seqlen,
                 "speed_reference": f"dense {REFERENCE}", "threads": args.threads, "host": cpu_name(),
                 "platform": platform.platform(), "command": "python " + shlex.join(sys.argv)})
    data.setdefault("points", [])
    done = {p["name"] for p in data["points"]}
    work_tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = args.work or Path(work_tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    dense_dir = resolve_stream_source(args.model)
    tok = comprune.load(args.model, dtype="float32")[1]
    ids = load_ids(tok, args.dataset)
    prompt = ids[:args.prompt_tokens].tolist()

    dirs = [(d, *describe_dir(d)) for d in args.pruned]
    for r in args.prune:
        d = work / f"{args.model}-{args.preset or 'comp'}-{r:.2f}"
        if not (d / "config.json").is_file():
            cmd = [sys.executable, "-m", "comprune.cli", "prune", args.model, "--ratio", str(r), "--out", str(d)]
            subprocess.run(cmd + (["--preset", args.preset] if args.preset else []), check=True)
        dirs.append((d, *describe_dir(d)))

    jobs = []  # (name, method, ratio, qtype, model dir, pad_to)
    if not args.no_original and args.model in EMBEDDED:
        kind = re.search(r"q\d_[0-9a-z_]+?(?=\.gguf$)", EMBEDDED[args.model][1].lower())
        jobs.append(("original", "original", 0.0, kind.group(0) if kind else "?", None, None))
    jobs += [(f"dense-{q}", "dense", 0.0, q, dense_dir, None) for q in args.dense_types]
    for d, method, ratio in dirs:
        for q in args.pruned_types:
            jobs.append((f"{method}-{ratio:.2f}-{q}", method, ratio, q, d, None))
            if args.pad256 and q.endswith(("_k", "_k_m")):
                jobs.append((f"{method}-{ratio:.2f}-{q}-pad256", method, ratio, q, d, 256))

    ref_path = work / f"reference-dense-{REFERENCE}.gguf"
    if not args.no_speed and not ref_path.is_file():
        export_gguf(dense_dir, ref_path, REFERENCE, imatrix=_imatrix(dense_dir, args, REFERENCE))
    for name, method, ratio, qtype, d, pad in jobs:
        if name in done:
            continue
        t0 = time.time()
        point = {"name": name, "method": method, "ratio": ratio, "qtype": qtype, "pad_to": pad,
                 "dir": str(d) if d else None}
        if d is None:  # the original file: comprune.load dequantizes exactly its weights
            path = embedded_gguf_path(args.model, work)
            model = comprune.load(args.model, dtype="float32")[0]
        else:
            path = work / f"{name}.gguf"
            if not path.is_file():
                info = export_gguf(d, path, qtype, pad_to=pad, imatrix=_imatrix(d, args, qtype))
                point["tensor_types"] = info["tensor_types"]
            model = comprune.load(str(d), dtype="float32")[0]
            if qtype != "f32":
                load_dequantized(model, d, path)
        point["bytes"] = path.stat().st_size
        ppl = perplexity(model, tok, args.dataset, seqlen=args.seqlen, max_tokens=args.max_tokens, ids=ids,
                         progress=False)
        point["ppl"] = round(ppl["ppl"], 4)
        if args.check:
            point["llamacpp_check"] = llamacpp_check(model, path, ids, args.check)
        del model
        if not args.no_speed:
            speed = relative_llamacpp_speed(path, ref_path, prompt, args.new_tokens, args.repeats, args.threads)
            point.update({k: speed[k] for k in ("prompt_tok_s", "gen_tok_s", "reference_gen_tok_s",
                                                "reference_prompt_tok_s")})
            point["gen_rel"], point["prompt_rel"] = speed["gen_relative"], speed["prompt_relative"]
            point.update(llamacpp_peak_rss_mb(path, args.threads))
        point["load_avg"] = [round(x, 2) for x in os.getloadavg()]
        point["seconds"] = round(time.time() - t0, 1)
        data["points"].append(point)
        print(json.dumps({k: point.get(k) for k in ("name", "bytes", "ppl", "gen_rel", "llamacpp_check")}),
              flush=True)
        _save(js, data)
        if d is not None and args.work is None:
            path.unlink()  # a temporary folder: keep the disk small
    if not args.no_speed:  # points measured before VmHWM was used
        for p in data["points"]:
            path = work / f"{p['name']}.gguf" if p["name"] != "original" else embedded_gguf_path(args.model, work)
            if p.get("peak_rss_mb") and p.get("rss_source") != "VmHWM" and path.is_file():
                p.update(llamacpp_peak_rss_mb(path, args.threads))
    _save(js, data)
    write_markdown(out.with_suffix(".md"), data)
    try:
        plot(out.with_suffix(".png"), data)
    except ImportError:
        print("matplotlib missing (pip install 'comprune[plot]'): no plot")


def _imatrix(d: Path, args, qtype: str):
    from comprune.export.gguf_quant import QUANT_TYPES
    from comprune.export.imatrix import imatrix_for, source_windows
    if not args.imatrix or qtype not in QUANT_TYPES:
        return None
    windows = None if (d / "pruning.json").is_file() else source_windows(d, "c4")  # the prunes' default windows
    return imatrix_for(d, windows)


def _save(js: Path, data: dict) -> None:
    pts = data["points"]
    for key, higher, flag in (("bytes", False, "pareto_bytes"), ("gen_rel", True, "pareto_speed")):
        front = pareto(pts, key, higher)
        for p in pts:
            p[flag] = p["name"] in front
    tmp = js.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, js)


def write_markdown(path: Path, data: dict) -> None:
    pts = sorted(data["points"], key=lambda p: p["bytes"])
    lines = [f"# Frontier: {data['model']}", "",
             f"`{data['command']}`", "",
             f"Host: {data['host']} ({data['platform']}), {data['threads']} llama.cpp threads. Perplexity: "
             f"{data['dataset']}, first {data['max_tokens']} tokens, PPL@{data['seqlen']}, of the GGUF's dequantized "
             f"weights. Speeds: llama.cpp, each point alternated run by run with the {data['speed_reference']} file "
             "(gen rel. = its generation tokens/s over that file's). ◆ = on the Pareto front of perplexity against "
             "bytes, ★ against generation speed.", "",
             "Peak RSS: the llama.cpp process that loaded the file and generated, less the same process after "
             "importing xllamacpp only. llama.cpp check: the largest |Δ log p| over llama.cpp's top-20 next tokens "
             "against the dequantized model in transformers, and top-1 agreement, at the end of a few 256-token "
             "windows.", "",
             "| point | type | MB | PPL | prompt tok/s | gen tok/s | gen rel. | peak RSS MB | llama.cpp check | front |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for p in pts:
        c = p.get("llamacpp_check") or {}
        check = f"{c['max_abs_dlogprob_top']:.3f}, top-1 {c['top1_agree']}/{c['windows']}" if c else "-"
        front = ("◆" if p.get("pareto_bytes") else "") + ("★" if p.get("pareto_speed") else "")
        lines.append(f"| {p['name']} | {p['qtype']} | {p['bytes'] / 1e6:.1f} | {p['ppl']:.2f} | "
                     f"{p.get('prompt_tok_s', '-')} | {p.get('gen_tok_s', '-')} | {p.get('gen_rel', '-')} | "
                     f"{_rss(p)} | {check} | {front} |")
    path.write_text("\n".join(lines) + "\n")


def _rss(p: dict) -> str:
    return f"{p['peak_rss_mb'] - p['import_rss_mb']:.0f}" if p.get("peak_rss_mb") else "-"


def plot(path: Path, data: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = data["points"]
    panels = [(key, flag, label) for key, flag, label in (
        ("bytes", "pareto_bytes", "file MB"), ("gen_rel", "pareto_speed", f"generation speed / {data['speed_reference']}"))
        if any(p.get(key) is not None for p in pts)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, flag, label) in zip(axes[0], panels):
        for method in sorted({p["method"] for p in pts}):
            sel = [p for p in pts if p["method"] == method and p.get(key) is not None]
            xs = [p[key] / 1e6 if key == "bytes" else p[key] for p in sel]
            ax.scatter(xs, [p["ppl"] for p in sel], label=method, s=18)
            for p, x in zip(sel, xs):
                ax.annotate(p["qtype"] + (f" {p['ratio']:.0%}" if p["ratio"] else ""), (x, p["ppl"]), fontsize=6)
        front = sorted([p for p in pts if p.get(flag)], key=lambda p: p[key])
        if front:
            ax.plot([p[key] / 1e6 if key == "bytes" else p[key] for p in front], [p["ppl"] for p in front], "k--",
                    lw=0.8, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel(f"PPL@{data['seqlen']} ({data['dataset']})")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"{data['model']}: pruning × quantization")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
