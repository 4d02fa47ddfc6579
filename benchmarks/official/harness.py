"""The harness counterparts of the official rows: `comprune prune --method M --ratio R`, at the official run's
parameter count, evaluated on the same slice with the same evaluator.

    python benchmarks/official/harness.py --method llm-pruner --ratio 0.21047 [--name llm-pruner] [-- extra CLI args]

Writes benchmarks/results/official/harness-<name>.json (prune time and peak RSS of the CLI process).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

REPO_SRC = Path(__file__).resolve().parents[2] / "src"


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--ratio", type=float, required=True)
    ap.add_argument("--name", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    name = args.name or args.method
    work = C.VENVS / "runs" / f"harness-{name}"
    out = work / "pruned"
    shutil.rmtree(out, ignore_errors=True)
    cli = ["prune", "smollm2", "--method", args.method, "--ratio", str(args.ratio), "--out", str(out), "--json", *extra]
    import os
    os.environ["PYTHONPATH"] = str(REPO_SRC)
    cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO_SRC)!r}); from comprune.cli import main; "
           f"sys.exit(main({cli!r}))"]
    run = C.run_measured(cmd, work, work / "run.log", args.threads)
    import torch

    import comprune
    torch.set_num_threads(args.threads)
    model, tok = comprune.load(str(out))
    before = C.dense_params()
    after = comprune.count_params(model)
    result = {"method": name, "kind": "harness", "command": "comprune " + " ".join(cli).replace(str(out), "OUT"),
              "benchmark_command": "python benchmarks/official/harness.py " + " ".join(sys.argv[1:]),
              "params_before": before, "params_after": after, "params_removed_pct": round(100 * (1 - after / before), 2),
              "prune": run, "slice": C.SLICE, "machine": C.machine()}
    result.update(C.evaluate(model, tok))
    C.write_result(f"harness-{name}", result)


if __name__ == "__main__":
    main()
