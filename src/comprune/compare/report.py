"""A comparison's report: one row per run, results.json, the markdown table and the plot."""
from __future__ import annotations

from pathlib import Path

from .. import deferred
from .records import RSS_PROBE, ppl_key, read_json, run_name, write_json


def rows(out: Path, settings: dict) -> list[dict]:
    """One row per recorded run (dense first), in the settings' ratio and method order."""
    rows = []
    names = ["dense"] + [run_name(m, r) for r in settings["ratios"] for m in settings["methods"]]
    seqlens, max_tokens = settings["ppl_seqlens"], settings["ppl_max_tokens"]
    for name in names:
        rec = read_json(out / "runs" / f"{name}.json")
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
            **{f"ppl{s}": get(ppl_key(s, False, max_tokens)) for s in seqlens},
            **{f"ppl{s}_full": get(ppl_key(s, True, max_tokens)) for s in seqlens},
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


def write_reports(out: Path, settings: dict) -> dict:
    """results.json, results.md and (with matplotlib) results.png from the run records; returns results.json."""
    found = rows(out, settings)
    shas = {r["calibration_sha256"] for r in found if r["calibration_sha256"]}
    floors = read_json(out / "runtime_floor.json")
    floor = floors.get("peak_rss_mb")
    result = {"settings": settings, "calibration_sha256": sorted(shas), "rows": found,
              "calibration_identical": len(shas) <= 1, "runtime_floor_mb": floor,
              "stream_runtime_floor_mb": floors.get("stream_peak_rss_mb")}
    write_json(out / "results.json", result)
    (out / "results.md").write_text(markdown_table(found, settings, shas, floor) + "\n")
    try:
        plot(found, out / "results.png", {**settings, "runtime_floor_mb": floor})
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
    plt = deferred.pyplot()
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
