"""Official ShortGPT (icip-cas/ShortGPT, shortgpt/shortgpt.py: block influence, remove the n lowest) on SmolLM2.

    python benchmarks/official/shortgpt.py [--layers 8] [--docs 128]

8 of 30 layers = what comprune's layer-drop removes at --ratio 0.2. Importance from `--docs` shuffled C4-sample
documents in 256-token strides (run_shortgpt.py's loop; PG-19 validation there). Writes
benchmarks/results/official/shortgpt.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

REPO = "icip-cas/ShortGPT"
REQUIREMENTS = ["transformers==4.43.4", "sentencepiece", "numpy<2", "safetensors", "accelerate"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--docs", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    code, commit = C.checkout(REPO)
    venv = C.ensure_venv("shortgpt", REQUIREMENTS)
    base = C.base_model_dir()
    work = C.VENVS / "runs" / "shortgpt"
    out = work / "pruned"
    recipe = [str(args.layers), str(args.docs), str(args.seed), str(base)]
    cmd = [str(venv / "bin" / "python"), str(C.SHIMS / "shortgpt_shim.py"), str(code), str(out), *recipe]
    run = C.run_measured(cmd, work, work / "run.log", args.threads)
    notes = ["shortgpt.py unchanged; run_shortgpt.py's loop in shims/shortgpt_shim.py with the C4 sample (seeded "
             "shuffle) for PG-19, float32 CPU load"]
    command = "python benchmarks/official/shortgpt.py " + " ".join(sys.argv[1:])
    C.finish("shortgpt", REPO, commit, ["n_prune_layers", str(args.layers), "docs", str(args.docs), "stride", "256"],
             command.strip(), venv, run, out, notes, args.threads)


if __name__ == "__main__":
    main()
