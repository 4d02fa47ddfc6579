"""Per-block MLP widths chosen by the width search, and its trace (docs/widths.md, docs/widths.png).

    python benchmarks/widths_plot.py                      # from the comparison's comp-search runs
    python benchmarks/widths_plot.py out/a/pruning.json   # or from any pruned models' manifests

Reads what the prune recorded (the comparison keeps each prune's manifest fields in runs/<name>.json):
`mlp_widths` (0 for a removed block), `details.search.levels` / `trace` / `dp_fitness`. Nothing is recomputed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNS = HERE / "results" / "compare" / "runs"


def load(paths: list[Path]) -> list[dict]:
    """(label, per-block widths, search record) of every manifest or comparison run given."""
    out = []
    for p in paths:
        rec = json.loads(p.read_text())
        prune = rec.get("prune", rec)  # a comparison run, or a pruning.json itself
        search = (prune.get("details") or {}).get("search")
        if not search or not prune.get("mlp_widths"):
            continue
        n = len(prune["kept_layers"]) + len(prune["removed_layers"])
        widths = [0] * n
        for i, w in zip(prune["kept_layers"], prune["mlp_widths"]):
            widths[i] = w
        label = f"{rec.get('method', prune.get('method'))} {100 * prune['ratio_requested']:.0f} %"
        out.append({"label": label, "widths": widths, "ratio": prune["ratio_requested"], "search": search,
                    "source": str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)})
    return sorted(out, key=lambda r: r["ratio"])


def plot(runs: list[dict], path: Path):
    sys.path.insert(0, str(ROOT / "src"))
    from comprune import deferred
    plt = deferred.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for r in runs:
        ax1.plot(range(len(r["widths"])), r["widths"], "o-", ms=4, label=r["label"])
        uniform = sum(r["widths"]) / max(1, sum(1 for w in r["widths"] if w))
        ax1.axhline(uniform, ls=":", lw=1, color=ax1.lines[-1].get_color())
        gens, fits = zip(*r["search"]["trace"])
        ax2.plot(gens, fits, "-", label=r["label"])
    ax1.set_xlabel("block")
    ax1.set_ylabel("MLP width kept (0: block removed)")
    ax1.set_title("Searched widths (dotted: the uniform width at the same budget)")
    ax1.grid(True, alpha=0.3)
    ax1.legend()
    ax2.set_xlabel("generation")
    ax2.set_ylabel("KL(dense ‖ pruned) per token, held-apart windows")
    ax2.set_title("Search trace (best so far)")
    ax2.grid(True, alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_doc(runs: list[dict], png: Path, doc: Path, command: str):
    lines = ["# Widths chosen by the search", "", f"Made by `{command}` from what the prunes recorded "
             "(pruning.json's `mlp_widths` and `details.search`).", "", f"![per-block widths and search trace]"
             f"({png.name})", ""]
    for r in runs:
        s = r["search"]
        lines += [f"## {r['label']} ({r['source']})", "",
                  f"Ladder: {s['step']} neurons a level, at most {s['top_level']} levels a block. Fitness: KL on "
                  f"{s['fitness_tokens']:,} held-apart tokens. DP start {s['dp_fitness']:.4f} → "
                  f"{s['fitness']:.4f} after {s['trace'][-1][0]} generations ({s['evaluations']} evaluations, "
                  f"{s['seconds']:.0f} s).", "",
                  "| block | " + " | ".join(str(i) for i in range(len(r["widths"]))) + " |",
                  "|---|" + "---:|" * len(r["widths"]),
                  "| width | " + " | ".join(str(w) if w else "—" for w in r["widths"]) + " |", ""]
    doc.write_text("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path, help="pruning.json files or comparison runs (default: "
                                                        "benchmarks/results/compare/runs/comp-search-*.json)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "widths.png")
    args = ap.parse_args(argv)
    paths = args.paths or sorted(RUNS.glob("comp-search-r*.json"))
    runs = load(paths)
    if not runs:
        print("no searched widths found (run the comparison with comp-search, or give pruning.json files)",
              file=sys.stderr)
        return 2
    plot(runs, args.out)
    command = "python benchmarks/widths_plot.py" + "".join(f" {p}" for p in args.paths)
    write_doc(runs, args.out, args.out.with_suffix(".md"), command)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
