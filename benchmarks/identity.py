"""Byte identity of pruned models across a code change: prune SmolLM2 with every method (and the width search)
on this host and record the sha256 of each model.safetensors, so a refactor can be checked to change nothing.

    python benchmarks/identity.py --out benchmarks/results/identity_before.json          # on the old code
    python benchmarks/identity.py --out benchmarks/results/identity_after.json           # on the new code
    python benchmarks/identity.py --compare benchmarks/results/identity_before.json benchmarks/results/identity_after.json

Each finished run is written at once (the file resumes); the thread count is pinned because float reductions
may differ with it."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RUNS = {
    "comp": ["--ratio", "0.2"],
    "layer-drop": ["--ratio", "0.2", "--method", "layer-drop"],
    "wanda-sp": ["--ratio", "0.2", "--method", "wanda-sp"],
    "magnitude": ["--ratio", "0.2", "--method", "magnitude"],
    "flap": ["--ratio", "0.2", "--method", "flap"],
    "llm-pruner": ["--ratio", "0.2", "--method", "llm-pruner"],
    "comp-search": ["--ratio", "0.2", "--preset", "comp-search"],
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def host() -> str:
    try:
        from comprune.precision import cpu_name
        return cpu_name()
    except Exception:  # noqa: BLE001 - a record without the host is still a record
        return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--only", default=",".join(RUNS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="out/identity")
    ap.add_argument("--compare", nargs=2)
    args = ap.parse_args()
    if args.compare:
        a, b = (json.loads(Path(p).read_text())["runs"] for p in args.compare)
        print("| run | before | after | equal |\n|---|---|---|---|")
        for name in RUNS:
            if name in a or name in b:
                x, y = a.get(name, {}).get("sha256"), b.get(name, {}).get("sha256")
                print(f"| {name} | {(x or '-')[:16]} | {(y or '-')[:16]} | {'yes' if x and x == y else 'NO'} |")
        return
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {"host": host(), "threads": args.threads, "runs": {}}
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for name in args.only.split(","):
        if name in record["runs"]:
            continue
        model_dir = Path(args.work) / name
        cmd = [sys.executable, "-m", "comprune.cli", "prune", "smollm2", "--out", str(model_dir), "--force",
               *RUNS[name]]
        t0 = time.time()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        record["runs"][name] = {"sha256": sha256(model_dir / "model.safetensors"), "seconds": round(time.time() - t0),
                                "command": " ".join(cmd[2:]), "rev": rev}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2))
        print(name, record["runs"][name]["sha256"][:16], record["runs"][name]["seconds"], "s", flush=True)


if __name__ == "__main__":
    main()
