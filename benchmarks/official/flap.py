"""Official FLAP and Wanda-sp (CASIA-IVA-Lab/FLAP, lib/prune.py) on SmolLM2, CPU.

    python benchmarks/official/flap.py --method flap      [--ratio 0.2534] [--structure AL-AM] [--nsamples 1024]
    python benchmarks/official/flap.py --method wanda-sp  [--ratio 0.3333]

FLAP: WIFV metric, bias compensation, 1024 C4 windows of 128 tokens, structure AL-AM (main.py's default and
scripts/llama_7b.sh's; --structure UL-UM for the uniform one). FLAP's ratio is a share of the attention+MLP
parameters, so 0.2534 removes ~20 % of all of SmolLM2's. Wanda-sp: uniform per layer, 128 C4 windows (its
loader's count); at 0.3333 int(0.3333 * 3 KV groups) = 0 groups go, 511 of 1536 MLP channels per layer (19.7 %).
The code runs with patches/flap-gqa.patch applied to a copy of the checkout (GQA: a head unit is a KV group).
Writes benchmarks/results/official/<method>.json.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

REPO = "CASIA-IVA-Lab/FLAP"
REQUIREMENTS = ["transformers==4.43.4", "sentencepiece", "numpy<2", "safetensors", "accelerate"]
PATCH = Path(__file__).resolve().parent / "patches" / "flap-gqa.patch"


def patched_copy(code: Path, work: Path) -> Path:
    dst = work / "FLAP"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(code, dst)
    subprocess.run(["patch", "-p1", "-i", str(PATCH)], cwd=dst, check=True, capture_output=True)
    return dst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["flap", "wanda-sp"], required=True)
    ap.add_argument("--ratio", type=float, default=None)
    ap.add_argument("--structure", default="AL-AM", choices=["UL-UM", "AL-AM"])
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    code, commit = C.checkout(REPO)
    venv = C.ensure_venv("flap", REQUIREMENTS)
    base = C.base_model_dir()
    name = args.method if args.method == "wanda-sp" or args.structure == "AL-AM" else f"flap-{args.structure.lower()}"
    work = C.VENVS / "runs" / name
    out = work / "pruned"
    src = patched_copy(code, work)
    if args.method == "flap":
        ratio, nsamples = args.ratio or 0.2534, args.nsamples or 1024
        recipe = ["--prune_method", "flap", "--metrics", "WIFV", "--structure", args.structure]
    else:
        ratio, nsamples = args.ratio or 0.3333, args.nsamples or 128
        recipe = ["--prune_method", "wanda_sp", "--metrics", "N/A", "--structure", "N/A"]
    recipe = ["--model", str(base), "--pruning_ratio", str(ratio), "--remove_heads", "-1", "--nsamples", str(nsamples),
              "--seed", str(args.seed), *recipe]
    cmd = [str(venv / "bin" / "python"), str(C.SHIMS / "flap_shim.py"), str(src), str(out), "--", *recipe]
    run = C.run_measured(cmd, work, work / "run.log", args.threads)
    notes = [f"lib/prune.py with {PATCH.name} (GQA: KV-group head units, head_dim from the model, compensation "
             "means in the model dtype); main.py's body in shims/flap_shim.py (CPU, stock Llama + zero o/down biases "
             "as get_llm adds); calibration from the local C4 sample with get_c4's loop (the repo's FLAP uses "
             "WikiText-2 train)"]
    command = "python benchmarks/official/flap.py " + " ".join(sys.argv[1:])
    C.finish(name, REPO, commit, recipe, command.strip(), venv, run, out, notes, args.threads)


if __name__ == "__main__":
    main()
