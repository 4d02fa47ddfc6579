"""Official LLM-Pruner (horseee/LLM-Pruner, llama3.py: block-wise Taylor, the GQA path) on SmolLM2, CPU.

    python benchmarks/official/llm_pruner.py [--ratio 0.3333] [--threads 2]

The paper's LLaMA recipe scaled to 30 layers (blocks 4..27 pruned), taylor param_first, no LoRA; calibration
10 C4 windows of 64 tokens, seed 42 (the C4 sample in place of BookCorpus). Writes
benchmarks/results/official/llm-pruner.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

REPO = "horseee/LLM-Pruner"
REQUIREMENTS = ["transformers==4.43.4", "sentencepiece", "numpy<2", "safetensors"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.3333)
    ap.add_argument("--start", type=int, default=4)
    ap.add_argument("--end", type=int, default=28)
    ap.add_argument("--num-examples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    code, commit = C.checkout(REPO)
    venv = C.ensure_venv("llm-pruner", REQUIREMENTS)
    base = C.base_model_dir()
    work = C.VENVS / "runs" / "llm-pruner"
    out = work / "pruned"
    recipe = ["--base_model", str(base), "--pruning_ratio", str(args.ratio), "--device", "cpu", "--eval_device", "cpu",
              "--block_wise", "--block_mlp_layer_start", str(args.start), "--block_mlp_layer_end", str(args.end),
              "--block_attention_layer_start", str(args.start), "--block_attention_layer_end", str(args.end),
              "--pruner_type", "taylor", "--taylor", "param_first", "--num_examples", str(args.num_examples),
              "--seed", str(args.seed), "--save_ckpt_log_name", "smollm2"]
    cmd = [str(venv / "bin" / "python"), str(C.SHIMS / "llm_pruner_shim.py"), str(code), str(out), "--", *recipe]
    run = C.run_measured(cmd, work, work / "run.log", args.threads)
    notes = ["llama3.py unchanged; shims: C4 sample instead of BookCorpus (get_c4's loop), float32 CPU load, "
             "the final PPLMetric call saves the model instead of downloading WikiText-2/PTB"]
    command = "python benchmarks/official/llm_pruner.py " + " ".join(sys.argv[1:])
    C.finish("llm-pruner", REPO, commit, recipe, command.strip(), venv, run, out, notes, args.threads)


if __name__ == "__main__":
    main()
