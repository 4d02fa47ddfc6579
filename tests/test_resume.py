"""A pruning run killed part-way by a signal resumes from its checkpoint to a bit-identical result."""
import json
import os
import random
import subprocess
import sys

from test_comp import _tiny_dir


def _prune(src, out, text, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "comprune.cli", "prune", str(src), "--ratio", "0.3",
                           "--layer-share", "0.5", "--nsamples", "8", "--seqlen", "32", "--calib", str(text),
                           "--out", str(out), "--json", *extra],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def _strip(manifest):
    return {k: v for k, v in manifest.items() if k not in ("seconds", "peak_rss_mb")}


import pytest


@pytest.mark.parametrize("recovery,extra", [("scales", ()), ("least-squares", ()),
                                            ("scales", ("--head-share", "0.3", "--head-unit", "kv", "--width-allocation", "adaptive")),
                                            # dense trajectory saved beside the pruned one, span folded, heads refitted
                                            ("least-squares", ("--target-mix", "0.5", "--layer-compensation",
                                                               "--head-share", "0.3"))])
def test_kill_and_resume_is_bit_identical(tmp_path, recovery, extra):
    src = _tiny_dir(tmp_path)
    rng = random.Random(0)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join("".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(2, 9)))
                             for _ in range(3000)))
    ref, out = tmp_path / "ref", tmp_path / "out"
    rec = ("--recovery", recovery, *extra)
    r = _prune(src, ref, text, *rec)
    assert r.returncode == 0, r.stderr

    r = _prune(src, out, text, *rec, env={"COMPRUNE_KILL_AFTER_BLOCK": "2"})
    assert r.returncode == -9, (r.returncode, r.stderr[-500:])  # SIGKILL
    assert not out.exists(), "a killed run must not leave a directory that looks complete"
    state = json.loads((tmp_path / ".out.checkpoint" / "state.json").read_text())
    assert state["next_block"] == 2

    r = _prune(src, out, text, *rec)
    assert r.returncode == 2 and "--resume" in r.stderr  # refuses to silently discard the checkpoint

    r = _prune(src, out, text, *rec, "--resume")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert (out / "config.json").read_bytes() == (ref / "config.json").read_bytes()
    a = json.loads((out / "pruning.json").read_text())
    b = json.loads((ref / "pruning.json").read_text())
    assert _strip(a) == _strip(b)
    assert not (tmp_path / ".out.checkpoint").exists()
