"""Plan a budget by the frontier: for a GGUF size or a llama.cpp speedup, every (ratio, type) pair that meets it,
with its quality where benchmarks/frontier.py measured it (or interpolated between measured ratios), and whether
quantization alone (the dense model at some type) meets the budget, and with less loss.

    result = plan("smollm2", target_size="60MB", frontier="benchmarks/results/frontier_smollm2.json")

Without a measurement a speed is predicted from bytes (generation in llama.cpp reads every weight once per
token, so it runs about as much faster as the file is smaller), and labelled so; a quality is never predicted.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CompruneError, require
from ..export.gguf import QTYPES
from ..export.size import gguf_bytes, parse_size
from ..stream import resolve_stream_source
from .targets import ratio_for_size

PLAN_TYPES = ["f16", "q8_0", "q6_k", "q5_k_m", "q5_1", "q5_0", "q4_k_m", "q4_1", "q4_0", "q3_k_m", "q2_k"]
DEFAULT_FRONTIERS = ("benchmarks/results/frontier_{model}.json", "benchmarks/results/frontier.json")


def read_frontier(path, model: str) -> dict | None:
    """The measured points of benchmarks/frontier.py's JSON for `model` (None when the file is for another)."""
    data = json.loads(Path(path).read_text())
    require(isinstance(data, dict) and isinstance(data.get("points"), list),
            f"{path} is not a frontier result (benchmarks/frontier.py writes one)")
    if data.get("model") not in (model, Path(str(model)).name):
        return None
    return data


def find_frontier(model: str, path=None) -> tuple[dict | None, str | None]:
    if path is not None:
        require(Path(path).is_file(), f"--frontier {path} not found")
        data = read_frontier(path, model)
        require(data is not None, f"{path} measures model '{json.loads(Path(path).read_text()).get('model')}', not "
                                  f"'{model}': pass that model's frontier file")
        return data, str(path)
    for pattern in DEFAULT_FRONTIERS:
        p = Path(pattern.format(model=Path(str(model)).name))
        if p.is_file():
            data = read_frontier(p, model)
            if data is not None:
                return data, str(p)
    return None, None


def _points(frontier: dict | None, qtype: str, method: str) -> list[dict]:
    if frontier is None:
        return []
    pts = [p for p in frontier["points"] if p.get("qtype") == qtype and p.get("ppl") is not None
           and (p.get("method") == method or p.get("method") == "dense")]
    return sorted(pts, key=lambda p: p["ratio"])


def quality(frontier: dict | None, qtype: str, ratio: float, method: str) -> tuple[float | None, str]:
    """(perplexity, how it is known) of `method` at `ratio` and `qtype`: measured, interpolated linearly between
    the measured ratios around it, or not measured."""
    pts = _points(frontier, qtype, method)
    for p in pts:
        if abs(p["ratio"] - ratio) < 0.005:
            return p["ppl"], "measured"
    below = [p for p in pts if p["ratio"] < ratio]
    above = [p for p in pts if p["ratio"] > ratio]
    if below and above:
        a, b = below[-1], above[0]
        t = (ratio - a["ratio"]) / (b["ratio"] - a["ratio"])
        return a["ppl"] + t * (b["ppl"] - a["ppl"]), f"interpolated ({a['ratio']:.2f}..{b['ratio']:.2f})"
    return None, "not measured"


def _measured_speedup(frontier, qtype, ratio, method) -> float | None:
    """Generation speed relative to the dense f16 file, from the frontier's speeds (each measured relative to
    the dense Q4_K_M, run by run)."""
    if frontier is None:
        return None
    def rel(q, r, m):
        for p in frontier["points"]:
            if p.get("qtype") == q and abs(p.get("ratio", -1) - r) < 0.005 and p.get("method") in (m, "dense") \
                    and p.get("gen_rel") is not None:
                return p["gen_rel"]
        return None
    base, got = rel("f16", 0.0, "dense"), rel(qtype, ratio, method)
    return got / base if base and got else None


def plan(model, target_size=None, target_speedup: float | None = None, frontier=None, method: str = "comp",
         types: list[str] | None = None) -> dict:
    """The candidates that meet a size or speed budget, best known quality first (see the module docstring)."""
    require((target_size is None) != (target_speedup is None), "give one of --target-size, --target-speedup")
    require(target_speedup is None or target_speedup > 1, f"--target-speedup {target_speedup} must be above 1")
    types = types or PLAN_TYPES
    bad = [t for t in types if t not in QTYPES]
    require(not bad, f"unknown GGUF type '{bad[0] if bad else ''}': use some of {', '.join(QTYPES)}")
    name = str(model)
    try:
        src = resolve_stream_source(model)
    except CompruneError:
        raise CompruneError(f"plan needs a model directory of safetensors (or 'smollm2'), not '{model}'") from None
    data, source = find_frontier(name, frontier)
    f16 = gguf_bytes(src, "f16")
    budget = parse_size(target_size) if target_size is not None else int(f16 / target_speedup)
    dense_ppl = quality(data, "f16", 0.0, method)[0]
    candidates, refused = [], {}
    for qtype in types:
        dense = gguf_bytes(src, qtype)
        if dense <= budget:
            ratio, nbytes = 0.0, dense
        else:
            try:
                ratio = ratio_for_size(src, budget, qtype)["ratio"]
            except CompruneError as e:
                refused[qtype] = str(e)
                continue
            nbytes = budget  # at most: the prune's margin lands a little under
        ppl, known = quality(data, qtype, ratio, method)
        speed = _measured_speedup(data, qtype, ratio, method)
        cand = {"qtype": qtype, "ratio": round(ratio, 4), "method": "dense" if ratio == 0 else method,
                "gguf_bytes": int(nbytes), "bytes_exact": ratio == 0, "ppl": None if ppl is None else round(ppl, 3),
                "quality": known, "speedup_vs_f16": round(speed, 3) if speed else round(f16 / nbytes, 3),
                "speed": "measured" if speed else "predicted from bytes"}
        if target_speedup is not None and speed is not None and speed < target_speedup:
            refused[qtype] = f"measured {speed:.2f}x, under {target_speedup}x"
            continue
        if ppl is not None and dense_ppl is not None:
            cand["loss_vs_f16"] = round(ppl / dense_ppl - 1, 4)
        candidates.append(cand)
    # known quality first, best first; the rest by how little they prune
    candidates.sort(key=lambda c: (c["ppl"] is None, c["ppl"] if c["ppl"] is not None else c["ratio"],
                                   -c["gguf_bytes"]))
    dense_ok = [c for c in candidates if c["ratio"] == 0]
    pruned = [c for c in candidates if c["ratio"] > 0]
    return {"model": name, "target_size": target_size, "target_speedup": target_speedup, "budget_bytes": budget,
            "dense_f16_bytes": f16, "frontier": source, "method": method, "candidates": candidates,
            "refused": refused, "verdict": verdict(dense_ok, pruned)}


def verdict(dense_ok: list[dict], pruned: list[dict]) -> str:
    """One sentence: does quantization alone meet the budget, and with less loss than pruning?"""
    if not dense_ok and not pruned:
        return "nothing meets this budget: every type refused (see refused)"
    if not dense_ok:
        best = pruned[0]
        return (f"quantization alone does not meet it: prune ({best['method']} {best['ratio']:.0%}) and export "
                f"{best['qtype']}" + (f", PPL {best['ppl']} ({best['quality']})" if best["ppl"] else
                                      " (quality not measured: run benchmarks/frontier.py)"))
    best_dense = min(dense_ok, key=lambda c: (c["ppl"] is None, c["ppl"] or 0, -c["gguf_bytes"]))  # unmeasured: largest
    known = [c for c in pruned if c["ppl"] is not None]
    if best_dense["ppl"] is None:
        return (f"quantization alone meets it: the dense model at {best_dense['qtype']} "
                f"({best_dense['gguf_bytes'] / 1e6:.1f} MB); quality not measured (run benchmarks/frontier.py)")
    if known and known[0]["ppl"] < best_dense["ppl"]:
        return (f"pruning helps: {known[0]['method']} {known[0]['ratio']:.0%} at {known[0]['qtype']} (PPL "
                f"{known[0]['ppl']}, {known[0]['quality']}) beats the best dense type, {best_dense['qtype']} "
                f"(PPL {best_dense['ppl']})")
    return (f"quantization alone meets it with less loss: the dense model at {best_dense['qtype']} "
            f"({best_dense['gguf_bytes'] / 1e6:.1f} MB, PPL {best_dense['ppl']})"
            + (f", against {known[0]['ppl']} for the best pruned candidate" if known else ""))
