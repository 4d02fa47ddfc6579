"""A comparison's report: one row per run, results.json, the markdown table and the plot."""
from __future__ import annotations

from pathlib import Path

from .. import deferred
from ..evaluate.significance import average_stderr, compare_runs
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
        zs, zf = rec.get("zeroshot", {}), rec.get("zeroshot_full", {})
        rows.append({
            "method": rec["method"], "ratio": rec["ratio"],
            "ratio_achieved": p.get("ratio_achieved", 0.0 if name == "dense" else None),
            "params": rec.get("params", p.get("params_after")),
            "layers": (f"{len(p['kept_layers'])}/{len(p['kept_layers']) + len(p['removed_layers'])}"
                       if p.get("kept_layers") is not None else None),
            **{f"ppl{s}": get(ppl_key(s, False, max_tokens)) for s in seqlens},
            **{f"ppl{s}_full": get(ppl_key(s, True, max_tokens)) for s in seqlens},
            "avg7": zs.get("average"), "zeroshot_tasks": {t: v.get(v.get("metric", "acc")) for t, v in zs.get("tasks", {}).items()} or None,
            "avg7_stderr": _avg_stderr(zs) if zs.get("average") is not None else None,
            # the runner leaves a stage's average empty until every task is in (runner.eval_zeroshot)
            "avg7_full": zf.get("average"),
            "avg7_full_stderr": _avg_stderr(zf) if zf.get("average") is not None else None,
            "zeroshot_full_tasks": {t: v.get(v["metric"]) for t, v in zf.get("tasks", {}).items()} or None,
            "prune_seconds": p.get("seconds"), "prune_wall_seconds": p.get("wall_seconds"),
            "peak_rss_mb": p.get("peak_rss_mb") if p.get("rss_probe") == RSS_PROBE else None,
            "stream_seconds": rec.get("stream", {}).get("seconds"),
            "stream_peak_rss_mb": rec.get("stream", {}).get("peak_rss_mb"),
            "stream_identical": rec.get("stream", {}).get("identical_to_in_memory"),
            "speed_relative": rec.get("speed", {}).get("relative", 1.0 if name == "dense" else None),
            "tokens_per_second": rec.get("speed", {}).get("tokens_per_second"),
            **llamacpp_fields(rec, name == "dense"),
            "chat_hits": rec.get("chat", {}).get("hits"), "chat_questions": rec.get("chat", {}).get("questions"),
            "chat_kl": rec.get("chat", {}).get("kl"),
            "calibration_sha256": p.get("calibration", {}).get("sha256"),
            "errors": rec.get("errors") or None})
    return rows


def _avg_stderr(zs: dict) -> float | None:
    tasks = zs.get("tasks", {})
    return average_stderr([t.get(f"{t.get('metric', 'acc')}_stderr") for t in tasks.values()]) if tasks else None


def zeroshot_tests(out: Path, settings: dict) -> list[dict]:
    """Paired tests at the zero-shot ratio, on the full sets and on the subset: every method against dense, and
    COMP against every other method (runs without per-example results, e.g. older records, are left out)."""
    ratio, methods = settings.get("zeroshot_ratio"), settings["methods"]
    if ratio is None:
        return []
    recs = {m: read_json(out / "runs" / f"{run_name(m, ratio)}.json") for m in methods}
    recs["dense"] = read_json(out / "runs" / "dense.json")
    pairs = [(m, "dense") for m in methods] + [("comp", m) for m in methods if m != "comp" and "comp" in methods]
    found = []
    for stage in ("zeroshot_full", "zeroshot"):
        for a, b in pairs:
            test = compare_runs(recs[a].get(stage, {}).get("tasks", {}), recs[b].get(stage, {}).get("tasks", {}))
            if test is not None:
                found.append({"stage": stage, "a": a, "b": b, **test})
    return found


def tests_markdown(tests: list[dict]) -> str:
    if not tests:
        return ""
    lines = ["", "", "Paired tests on per-example correctness (same examples for both; a − b in points of the "
             "task average, paired bootstrap over each task's examples, 2,000 resamples; per-task exact McNemar "
             "p-values):", "",
             "| set | a | b | a − b (pts) | 95 % CI | p (bootstrap) | tasks with McNemar p < 0.05 |",
             "|---|---|---|---:|---:|---:|---|"]
    for t in tests:
        avg = t["average"]
        sig = [k for k, v in t["tasks"].items() if v["p"] < 0.05]
        lines.append(f"| {'full' if t['stage'] == 'zeroshot_full' else 'subset'} | {t['a']} | {t['b']} | "
                     f"{100 * avg['diff']:+.2f} | [{100 * avg['ci95'][0]:+.2f}, {100 * avg['ci95'][1]:+.2f}] | "
                     f"{avg['p']:.3f} | {', '.join(sig) or 'none'} |")
    return "\n".join(lines)


def write_reports(out: Path, settings: dict) -> dict:
    """results.json, results.md and (with matplotlib) results.png from the run records; returns results.json."""
    found = rows(out, settings)
    tests = zeroshot_tests(out, settings)
    shas = {r["calibration_sha256"] for r in found if r["calibration_sha256"]}
    floors = read_json(out / "runtime_floor.json")
    floor = floors.get("peak_rss_mb")
    result = {"settings": settings, "calibration_sha256": sorted(shas), "rows": found,
              "calibration_identical": len(shas) <= 1, "runtime_floor_mb": floor,
              "stream_runtime_floor_mb": floors.get("stream_peak_rss_mb"), "zeroshot_tests": tests}
    write_json(out / "results.json", result)
    (out / "results.md").write_text(markdown_table(found, settings, shas, floor) + tests_markdown(tests) + "\n")
    try:
        plot(found, out / "results.png", {**settings, "runtime_floor_mb": floor})
    except ImportError:
        pass
    return result


def llamacpp_fields(rec: dict, dense: bool) -> dict:
    lc = rec.get("llamacpp", {})
    if dense:
        return {"llamacpp_prompt_relative": 1.0, "llamacpp_gen_relative": 1.0}
    return {"llamacpp_prompt_relative": lc.get("prompt_relative"), "llamacpp_gen_relative": lc.get("gen_relative"),
            "llamacpp_prompt_tok_s": lc.get("prompt_tok_s"), "llamacpp_gen_tok_s": lc.get("gen_tok_s"),
            "llamacpp_dense_prompt_tok_s": lc.get("reference_prompt_tok_s"),
            "llamacpp_dense_gen_tok_s": lc.get("reference_gen_tok_s"), "llamacpp_arch": lc.get("arch"),
            "llamacpp_skipped": lc.get("skipped")}


def llamacpp_cell(r: dict) -> str:
    if r.get("llamacpp_prompt_relative") is None:
        return "- (skipped†)" if r.get("llamacpp_skipped") else "-"
    arch = "" if r.get("llamacpp_arch") in (None, "llama", "qwen2") else f" ({r['llamacpp_arch']})"
    return f"{r['llamacpp_prompt_relative']:.2f}× / {r['llamacpp_gen_relative']:.2f}×{arch}"


def llamacpp_note(rows: list[dict]) -> str:
    measured = [r for r in rows if r.get("llamacpp_dense_gen_tok_s")]
    note = (" llama.cpp: the model exported to GGUF (f16) and run in llama.cpp (xllamacpp), prompt processing of "
            "the first 128 WikiText-2 test tokens and greedy generation, alternating with the dense export run by "
            "run; the ratio of medians (per-layer widths export to llama.cpp's `deci` arch, marked). The export pads "
            "MLP widths with zero neurons to a multiple of 32 (docs/budgets.md). These ratios move between sessions: "
            "differences under about 0.1× between rows are not resolved.")
    if measured:
        pp = sorted(r["llamacpp_dense_prompt_tok_s"] for r in measured)
        tg = sorted(r["llamacpp_dense_gen_tok_s"] for r in measured)
        note += (f" Dense in llama.cpp: {pp[len(pp) // 2]:.0f} prompt tok/s, {tg[len(tg) // 2]:.0f} generated tok/s "
                 "(median over the runs' dense measurements).")
    skipped = sorted({r["llamacpp_skipped"] for r in rows if r.get("llamacpp_skipped")})
    if skipped:
        note += " † skipped: " + "; ".join(skipped) + "."
    return note


def _avg_cell(avg, se) -> str:
    if avg is None:
        return "-"
    return f"{100 * avg:.2f}" + ("" if se is None else f" ± {100 * se:.2f}")


def _chat_cell(r: dict) -> str:
    if r.get("chat_hits") is None:
        return "-"
    return f"{r['chat_hits']}/{r['chat_questions']} / {_f(r.get('chat_kl'), '{:.3f}')}"


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def markdown_table(rows: list[dict], settings: dict, shas=(), floor_mb: float | None = None) -> str:
    seqlens = settings["ppl_seqlens"]
    mt = settings["ppl_max_tokens"]
    head = ["method", "ratio (req → got)", "params (M)", "layers"]
    head += [f"PPL@{s} ({mt // 1024}k tok)" for s in seqlens] + [f"PPL@{s} full" for s in seqlens]
    full_zs = any(r.get("avg7_full") is not None for r in rows)
    head += ["7-task avg (%)"] + (["7-task avg, full sets (%)"] if full_zs else [])
    head += ["chat hits / KL"]
    head += ["prune s", "peak RSS (MB)", "streamed: s / peak RSS (MB)", "gen tok/s vs dense",
             "llama.cpp prompt / gen tok/s vs dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        ratio = "0" if r["method"] == "dense" else f"{r['ratio']:.2f} → {_f(r['ratio_achieved'], '{:.4f}')}"
        cells = [r["method"], ratio, _f(r["params"] / 1e6 if r["params"] else None, "{:.2f}"), r["layers"] or "-"]
        cells += [_f(r[f"ppl{s}"]) for s in seqlens] + [_f(r[f"ppl{s}_full"]) for s in seqlens]
        streamed = "-" if r.get("stream_peak_rss_mb") is None else \
            f"{r['stream_seconds']:.0f} / {r['stream_peak_rss_mb']:.0f}" + ("" if r["stream_identical"] else " (≠!)")
        cells += [_avg_cell(r["avg7"], r.get("avg7_stderr"))]
        if full_zs:
            cells += [_avg_cell(r.get("avg7_full"), r.get("avg7_full_stderr"))]
        cells += [_chat_cell(r)]
        cells += [_f(r["prune_seconds"], "{:.0f}"),
                  _f(r["peak_rss_mb"], "{:.0f}"), streamed, _f(r["speed_relative"], "{:.2f}×"), llamacpp_cell(r)]
        if r.get("errors"):
            cells[0] += " (error: " + "; ".join(f"{k}" for k in r["errors"]) + ")"
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    note = (f"\nCalibration: {settings['calib']}, {settings['nsamples']} × {settings['seqlen']} tokens, seed "
            f"{settings['seed']}; sha256 " + (", ".join(s[:16] + "…" for s in sorted(shas)) or "-") +
            (" (identical for every method)" if len(shas) == 1 else " (DIFFERS between runs!)" if shas else "") +
            f". Zero-shot: {settings['zeroshot_tasks']}, subset {settings['zeroshot_subset']} per task, at ratio "
            f"{settings['zeroshot_ratio']}" + (" (and the full sets, when `--zeroshot-full` ran)" if
                                              settings.get("zeroshot_full") else "") +
            " (± the standard error of the average: the tasks' stderrs combined, sqrt(Σ se²) / 7)"
            f"; full-test-set perplexity at ratio {settings['full_ratio']}. "
            "Chat: exact-answer hits on the test half's short questions and KL(dense ‖ model) in nats per token on "
            "the dense model's greedy answers, through the chat template (comprune.evaluate.chat). "
            "Peak RSS: the pruning process's own high-water mark (wait4's ru_maxrss through a small launcher, or its "
            "VmHWM if larger). Streamed: the same prune with "
            "`--stream` (one block in memory) in its own process; its weights equal the in-memory prune's "
            "(sha256) unless marked ≠.")
    note += llamacpp_note(rows)
    if floor_mb:
        note += (f" Runtime floor: {floor_mb:.0f} MB is the peak RSS of a process that only imports comprune "
                 "(python, torch, transformers' modeling code) and builds the model's skeleton without weights; "
                 "every in-memory pruning process pays it before its own work (a streamed prune uses comprune's "
                 "plain-PyTorch modules instead of transformers' modeling code: a lower floor).")
    tasks = next((list(r["zeroshot_tasks"]) for r in rows if r.get("zeroshot_tasks")), None)
    if tasks:
        zs = [r for r in rows if r.get("zeroshot_tasks")]
        others = [t for t in tasks if t != "boolq"]
        has_boolq = len(others) < len(tasks)
        note += "\n\nZero-shot per task (%; acc_norm for hellaswag, arc_challenge, openbookqa, acc otherwise):\n\n"
        note += "| method | ratio | " + " | ".join(tasks) + " | average |" + (" without boolq |" if has_boolq else "") + \
            "\n|---|---:|" + "---:|" * (len(tasks) + 1 + has_boolq)
        for r in zs:
            got = r["zeroshot_tasks"]
            vals = [_f(100 * got[t] if got.get(t) is not None else None) for t in tasks]
            note += f"\n| {r['method']} | {r['ratio']:.2f} | " + " | ".join(vals) + \
                f" | {_f(100 * r['avg7'] if r.get('avg7') is not None else None)} |"
            if has_boolq:
                rest = [got[t] for t in others if got.get(t) is not None]
                note += f" {_f(100 * sum(rest) / len(rest)) if len(rest) == len(others) else '-'} |"
        dense = next((r for r in zs if r["method"] == "dense"), None)
        if has_boolq and dense is not None and dense["zeroshot_tasks"].get("boolq") is not None:
            note += ("\n\nBoolQ at this scale runs against the average: the dense model scores "
                     f"{100 * dense['zeroshot_tasks']['boolq']:.1f} %, below the 62 % of always answering \"yes\" (BoolQ validation: 2,033 of 3,270), "
                     "so a model that loses its reading of the passage and drifts toward \"yes\" gains on BoolQ. The "
                     "column without it is the average over the other tasks.")
    return "\n".join(lines) + "\n" + note


COLORS = {"dense": "black", "comp": "tab:red", "llm-pruner": "tab:blue", "flap": "tab:green",
          "layer-drop": "tab:purple", "wanda-sp": "tab:orange", "magnitude": "tab:gray", "comp-search": "darkred",
          "comp-spec": "lightcoral"}


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
