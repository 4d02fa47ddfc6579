"""GPU check: the same prunes with `--device cuda`, in memory and streamed, against the CPU's.

Tiny random Llama and Qwen2 models (and SmolLM2 with --smollm2 when its files are at hand) are pruned by COMP,
the width search (a few generations), wanda-sp and FLAP on the CPU and on the GPU, and streamed on the GPU. Per
run: whether the kept layers and neurons are the CPU's, the largest difference of the pruned models' logits on
a fixed batch (both evaluated on the CPU in float32), whether the streamed GPU prune's weights equal the in-memory
GPU prune's, and the seconds. Where no CUDA device is present it says it was skipped and exits 0.

    python benchmarks/gpu_check.py                   # writes benchmarks/results/gpu_check.json and .md
    python benchmarks/gpu_check.py --device cpu      # the check's own logic, CPU against CPU (tests use it)
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RUNS = {  # name -> PruneConfig settings (a ratio of the blocks: the tiny models' embeddings are half of them)
    "comp": dict(ratio=0.3, ratio_of="blocks", layer_share=0.5),
    "comp-search": dict(ratio=0.3, ratio_of="blocks", width_allocation="search", search_generations=3,
                        search_nsamples=2),
    "wanda-sp": dict(ratio=0.3, ratio_of="blocks", method="wanda-sp"),
    "flap": dict(ratio=0.3, ratio_of="blocks", method="flap"),
}
LOGIT_TOLERANCE = 1e-3  # float32 on two devices: summation orders differ, a flipped neuron choice shows far above


def tiny_dir(path: Path, family: str) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    cfg = AutoConfig.for_model(family, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=256, head_dim=16,
                               max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # spread the weights: random init gives near-identical blocks
            p.mul_(1 + torch.rand_like(p))
    model.save_pretrained(path, max_shard_size="100KB")
    tk = Tokenizer(models.WordLevel({chr(32 + i): i for i in range(95)} | {"[UNK]": 95}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(path)
    return path


def calibration(vocab: int, n: int = 8, t: int = 32):
    from comprune import Calibration
    return Calibration(torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(0)), "random", 0)


def kept(report) -> dict:
    return {"layers": report.kept_layers, "neurons": {k: v.get("kept_neurons") for k, v in report.blocks.items()}}


def logits(model, ids) -> torch.Tensor:
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def check(source: Path, name: str, settings: dict, device: str, out: Path) -> dict:
    from comprune import PruneConfig, load, prune, prune_streaming, save_pretrained
    from comprune.io import weights_digest
    dense, tok = load(source, dtype="float32")
    vocab = dense.config.vocab_size
    calib = calibration(min(vocab, 256))
    ids = torch.randint(0, min(vocab, 256), (2, 24), generator=torch.Generator().manual_seed(1))
    row = {"run": name, "device": device}
    t0 = time.perf_counter()
    cpu_model, cpu = prune(copy.deepcopy(dense), tok, PruneConfig(**settings, batch_size=4), calibration=calib,
                           progress=False)
    row["cpu_seconds"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    dev_model, dev = prune(copy.deepcopy(dense), tok, PruneConfig(**settings, batch_size=4, device=device),
                           calibration=calib, progress=False)
    row["device_seconds"] = round(time.perf_counter() - t0, 2)
    row["same_choice"] = kept(cpu) == kept(dev)
    row["max_logit_diff"] = float((logits(cpu_model, ids) - logits(dev_model, ids)).abs().max())
    save_pretrained(dev_model, tok, out / f"{name}-mem", dev)
    if name != "flap":  # FLAP's bias slots are model-wide: it does not stream
        t0 = time.perf_counter()
        prune_streaming(source, out / f"{name}-stream", PruneConfig(**settings, batch_size=4, device=device),
                        calibration=calib, progress=False)
        row["stream_seconds"] = round(time.perf_counter() - t0, 2)
        row["stream_equals_memory"] = weights_digest(out / f"{name}-stream") == weights_digest(out / f"{name}-mem")
    row["ok"] = row["same_choice"] and row["max_logit_diff"] <= LOGIT_TOLERANCE and \
        row.get("stream_equals_memory", True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="the device checked against the CPU (cpu: the check itself)")
    ap.add_argument("--families", default="llama,qwen2")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (COMP at 20 %%) when its files exist")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check"))
    args = ap.parse_args()
    from comprune.precision import cpu_name
    record = {"command": shlex.join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]), "host": cpu_name(),
              "torch": torch.__version__, "device": args.device}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        record["skipped"] = "no CUDA device on this machine"
        print(f"gpu_check: skipped: {record['skipped']}")
        _write(Path(args.out), record)
        return 0
    if args.device.startswith("cuda"):
        record["gpu"] = torch.cuda.get_device_name(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="comprune-gpu-check-") as tmp:
        tmp = Path(tmp)
        sources = [(f, tiny_dir(tmp / f, f)) for f in args.families.split(",") if f]
        if args.smollm2:
            try:
                from comprune.loading import embedded_cached_dir
                sources.append(("smollm2", embedded_cached_dir("smollm2")))
            except Exception as e:  # noqa: BLE001 - the tiny models still say whether the device works
                record["smollm2"] = f"not checked: {e}"
        for family, src in sources:
            runs = {"comp": dict(ratio=0.2)} if family == "smollm2" else {r: RUNS[r] for r in args.runs.split(",")}
            for name, settings in runs.items():
                row = {"family": family, **check(src, name, settings, args.device, tmp / family)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    record["rows"] = rows
    record["ok"] = all(r["ok"] for r in rows)
    _write(Path(args.out), record)
    print(f"gpu_check: {'ok' if record['ok'] else 'FAILED'} ({sum(r['ok'] for r in rows)}/{len(rows)} runs)")
    return 0 if record["ok"] else 1


def _write(out: Path, record: dict):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# GPU check", "", f"Host: {record['host']}; device: {record.get('gpu', record['device'])}; torch "
             f"{record['torch']}.", ""]
    if "skipped" in record:
        lines += [f"Skipped: {record['skipped']}.", ""]
    else:
        head = ["family", "run", "same kept layers/neurons", "max abs Δ logits", "stream = in-memory", "CPU s",
                "device s", "stream s", "ok"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in record["rows"]:
            lines.append("| " + " | ".join(str(v) for v in (
                r["family"], r["run"], r["same_choice"], f"{r['max_logit_diff']:.2e}",
                r.get("stream_equals_memory", "- (does not stream)"), r["cpu_seconds"], r["device_seconds"],
                r.get("stream_seconds", "-"), r["ok"])) + " |")
        lines.append("")
    lines += ["```", record["command"], "```", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
