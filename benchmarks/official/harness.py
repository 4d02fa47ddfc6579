"""The harness counterparts of the official rows: `comprune prune --method M --ratio R`, at the official run's
parameter count, evaluated on the same slice with the same evaluator.

    python benchmarks/official/harness.py --method llm-pruner --ratio 0.21047 [--name llm-pruner] [-- extra CLI args]
    python benchmarks/official/harness.py --method flap --ratio 0.20056 --official-windows flap

Writes benchmarks/results/official/harness-<name>.json (prune time and peak RSS of the CLI process). With
--official-windows, the harness calibrates on the windows the official run drew (its own sampling loop on the
same local C4 sample, same seed) instead of the shared calibration set, through the Python API in this process:
that separates what the algorithm does from which tokens it saw.
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

REPO_SRC = Path(__file__).resolve().parents[2] / "src"


def official_windows(kind: str, tok):
    """The calibration windows the official run drew, by its own loop on the same C4 sample (shims/): FLAP's and
    Wanda-sp's get_c4, 128 windows of 128 tokens from documents longer than that, random.seed(0)."""
    import torch

    from comprune.data import Calibration
    sys.path.insert(0, str(C.SHIMS))
    import offline
    texts = offline.c4_texts()
    nsamples, seqlen, seed = {"flap": (128, 128, 0)}[kind]
    random.seed(seed)
    windows = []
    for _ in range(nsamples):
        while True:
            ids = tok(texts[random.randint(0, len(texts) - 1)], return_tensors="pt").input_ids
            if ids.shape[1] > seqlen:
                break
        i = random.randint(0, ids.shape[1] - seqlen - 1)
        windows.append(ids[:, i:i + seqlen])
    return Calibration(torch.cat(windows), f"c4 ({kind}'s get_c4 loop, official windows)", seed)


def run_with_windows(args, kind: str, out: Path) -> dict:
    import torch

    import comprune
    torch.set_num_threads(args.threads)
    model, tok = comprune.load("smollm2")
    cfg = comprune.PruneConfig(method=args.method, ratio=args.ratio)
    t0 = time.perf_counter()
    model, report = comprune.prune(model, tok, cfg, calibration=official_windows(kind, tok), progress=False,
                                   base_model="smollm2")
    comprune.save_pretrained(model, tok, out, report, force=True)
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(report.peak_rss_mb, 1),
            "threads": args.threads, "calibration": report.calibration}


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--ratio", type=float, required=True)
    ap.add_argument("--name", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--official-windows", choices=["flap"], default=None,
                    help="calibrate on the official run's own windows (FLAP's get_c4 loop; Wanda-sp uses the same)")
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
    if args.official_windows:
        if extra:
            sys.exit("--official-windows runs the method's defaults through the Python API: drop the extra CLI args")
        sys.path.insert(0, str(REPO_SRC))
        run = run_with_windows(args, args.official_windows, out)
        cli = ["prune", "smollm2", "--method", args.method, "--ratio", str(args.ratio),
               f"(Python API: calibration = {args.official_windows}'s official windows)"]
    else:
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
