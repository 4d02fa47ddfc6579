"""benchmarks/gpu_check.py: where no GPU is present it says it was skipped (exit 0); its own logic, run CPU
against CPU, finds every prune the same, in memory and streamed."""
import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(tmp_path, *args):
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "check"), *args], capture_output=True,
                       text=True, timeout=600)
    return r, json.loads((tmp_path / "check.json").read_text())


def test_gpu_check_skips_without_a_gpu_and_checks_itself_on_the_cpu(tmp_path):
    if not torch.cuda.is_available():
        r, rec = _run(tmp_path)
        assert r.returncode == 0 and "skipped" in r.stdout and rec["skipped"]
    r, rec = _run(tmp_path, "--device", "cpu", "--families", "llama", "--runs", "comp,flap")
    assert r.returncode == 0, r.stderr[-2000:]
    assert rec["ok"] and len(rec["rows"]) == 2
    assert all(row["same_choice"] and row["max_logit_diff"] == 0.0 for row in rec["rows"])
    assert rec["rows"][0]["stream_equals_memory"] is True
