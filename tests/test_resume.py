"""A pruning run killed part-way by a signal resumes from its checkpoint to a bit-identical result.

The CLI runs as forked jobs of the session's fault driver (tests/_reliability.jobs: a real process per run,
killed by SIGKILL, without a new interpreter's imports each time); all configurations share two batches."""
import json
import random

import pytest

from _reliability import jobs
from test_comp import _tiny_dir

CONFIGS = {
    "scales": ("--recovery", "scales"),
    "least-squares": ("--recovery", "least-squares"),
    "scales-heads-adaptive": ("--recovery", "scales", "--head-share", "0.3", "--head-unit", "kv",
                              "--width-allocation", "adaptive"),
    # dense trajectory saved beside the pruned one, span folded, heads refitted
    "least-squares-mix-compensation-heads": ("--recovery", "least-squares", "--target-mix", "0.5",
                                             "--layer-compensation", "--head-share", "0.3"),
}


def _prune(src, out, text, *extra, env=None) -> dict:
    return {"argv": ["prune", src, "--ratio", "0.3", "--layer-share", "0.5", "--nsamples", "8", "--seqlen", "32",
                     "--calib", text, "--out", out, "--json", *extra], "env": env or {}}


def _strip(manifest):
    return {k: v for k, v in manifest.items() if k not in ("seconds", "peak_rss_mb")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per configuration: a reference run, a run killed after block 2, then (second batch) a rerun without
    --resume and one with it."""
    root = tmp_path_factory.mktemp("resume")
    src = _tiny_dir(root)
    rng = random.Random(0)
    text = root / "calib.txt"
    text.write_text(" ".join("".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(2, 9)))
                             for _ in range(3000)))
    dirs = {name: root / name for name in CONFIGS}
    for d in dirs.values():
        d.mkdir()
    first = jobs([job for name, rec in CONFIGS.items() for job in (
        _prune(src, dirs[name] / "ref", text, *rec),
        _prune(src, dirs[name] / "out", text, *rec, env={"COMPRUNE_KILL_AFTER_BLOCK": "2"}))], root)
    after_kill = {}
    for i, name in enumerate(CONFIGS):
        ckpt = dirs[name] / ".out.checkpoint" / "state.json"
        after_kill[name] = {"out_exists": (dirs[name] / "out").exists(),
                            "state": json.loads(ckpt.read_text()) if ckpt.is_file() else None}
    second = jobs([job for name, rec in CONFIGS.items() for job in (
        _prune(src, dirs[name] / "out", text, *rec), _prune(src, dirs[name] / "out", text, *rec, "--resume"))], root)
    return {name: {"dir": dirs[name], "ref": first[2 * i], "killed": first[2 * i + 1], **after_kill[name],
                   "rerun": second[2 * i], "resumed": second[2 * i + 1]} for i, name in enumerate(CONFIGS)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kill_and_resume_is_bit_identical(runs, name):
    r = runs[name]
    d = r["dir"]
    assert r["ref"]["rc"] == 0, r["ref"]["stderr"][-2000:]
    assert r["killed"]["rc"] == -9, (r["killed"]["rc"], r["killed"]["stderr"][-500:])  # SIGKILL
    assert not r["out_exists"], "a killed run must not leave a directory that looks complete"
    assert r["state"] is not None and r["state"]["next_block"] == 2
    # refuses to silently discard the checkpoint
    assert r["rerun"]["rc"] == 2 and "--resume" in r["rerun"]["stderr"], r["rerun"]["stderr"][-1000:]
    assert r["resumed"]["rc"] == 0, r["resumed"]["stderr"][-2000:]
    out, ref = d / "out", d / "ref"
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert (out / "config.json").read_bytes() == (ref / "config.json").read_bytes()
    a = json.loads((out / "pruning.json").read_text())
    b = json.loads((ref / "pruning.json").read_text())
    assert _strip(a) == _strip(b)
    assert not (d / ".out.checkpoint").exists()
