"""A run's own state and budget: the width search's database and evolution belong to one run (a resume with
another model of the same shape is refused, wherever the kill landed, and the right run resumes to the same
bytes), and a ratio that takes most of the blocks is said."""
from __future__ import annotations

import shutil

import pytest

from _reliability import assert_clean_error, calib_text, jobs, tiny_dir

SEARCH = ["--preset", "comp-search", "--search-generations", "6", "--search-nsamples", "2", "--ratio", "0.3",
          "--nsamples", "6", "--seqlen", "32", "--calib-batch-size", "2", "--dtype", "float32", "--json"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("search-faults")
    src, other = tiny_dir(root / "tiny", layers=4), tiny_dir(root / "other", seed=1, layers=4)
    text = calib_text(root / "calib.txt", words=3000)
    ref = root / "ref"
    r, = jobs([{"argv": ["prune", src, "--out", ref, "--calib", text, *SEARCH]}], root)
    assert r["rc"] == 0, r["stderr"][-2000:]
    return {"src": src, "other": other, "text": text, "ref": ref, "sites": r["sites"], "root": root}


def _first(sites, needle):
    return next(i for i, s in enumerate(sites, 1) if needle in s)


@pytest.mark.parametrize("where", ["database.py:save", "search.json"])
def test_search_state_is_not_resumed_by_another_model(env, tmp_path, where):
    when = _first(env["sites"], where) + 1  # killed after the first database block / evolution state is written
    model = shutil.copytree(env["src"], tmp_path / "model")
    out = tmp_path / "out"
    args = ["prune", model, "--out", out, "--calib", env["text"], *SEARCH]
    r, = jobs([{"argv": args, "kill_at_rename": when}], tmp_path)
    assert r["rc"] == -9, r["stderr"][-1500:]
    shutil.copy(env["other"] / "model.safetensors", model / "model.safetensors")  # same path, other weights
    r, = jobs([{"argv": [*args, "--resume"]}], tmp_path)
    assert_clean_error(r["rc"], r["stderr"], "different run")
    shutil.copy(env["src"] / "model.safetensors", model / "model.safetensors")  # the right model resumes
    r, = jobs([{"argv": [*args, "--resume"]}], tmp_path)
    assert r["rc"] == 0, r["stderr"][-1500:]
    assert (out / "model.safetensors").read_bytes() == (env["ref"] / "model.safetensors").read_bytes()


def test_a_ratio_that_takes_most_of_the_blocks_is_said(tmp_path, capsys):
    """An embedding-heavy model: 20 % of all parameters is over half of the blocks'. The prune says so (stderr
    and pruning.json) and points to --ratio-of blocks; a budget under half of the blocks says nothing."""
    import copy

    from comprune import PruneConfig, prune
    from conftest import calib, tiny_model
    dense = tiny_model("llama", layers=4, vocab=6144)
    _, rep = prune(copy.deepcopy(dense), None, PruneConfig(ratio=0.15, batch_size=4), calibration=calib(4, 16))
    note = rep.details["budget_note"]
    assert "--ratio-of blocks" in note and "of the decoder blocks' parameters" in note
    assert f"comprune: note: {note}" in capsys.readouterr().err
    _, rep = prune(copy.deepcopy(dense), None, PruneConfig(ratio=0.15, ratio_of="blocks", batch_size=4),
                   calibration=calib(4, 16), progress=False)
    assert "budget_note" not in rep.details
    _, rep = prune(tiny_model("llama", layers=4), None, PruneConfig(ratio=0.2, batch_size=4), calibration=calib(4, 16),
                   progress=False)
    assert "budget_note" not in rep.details


def test_resume_under_auto_keeps_the_interrupted_runs_precision(tmp_path, capsys, monkeypatch):
    """--dtype auto's probe may choose otherwise on a resume (another load on the machine): the resumed run
    computes in the precision the interrupted one chose, to the same bytes and the same precision record."""
    import json

    from comprune import precision
    from comprune.checkpoint import Checkpoint
    from _reliability import main
    src, text = tiny_dir(tmp_path / "tiny"), calib_text(tmp_path / "calib.txt")
    args = ["prune", src, "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32", "--calib", text, "--json"]
    chosen = {"dtype": "bfloat16"}
    monkeypatch.setattr(precision, "choose", lambda device="cpu", config=None: precision.Choice(
        chosen["dtype"], reason=f"probe chose {chosen['dtype']}"))
    assert main([*args, "--out", tmp_path / "ref"], capsys)[0] == 0
    save = Checkpoint.save

    def interrupted(self, next_block, acts, details):
        save(self, next_block, acts, details)
        if next_block == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(Checkpoint, "save", interrupted)
    assert main([*args, "--out", tmp_path / "out"], capsys)[0] == 130
    monkeypatch.setattr(Checkpoint, "save", save)
    chosen["dtype"] = "float32"  # the probe now chooses otherwise
    code, err = main([*args, "--out", tmp_path / "out", "--resume"], capsys)
    assert code == 0, err[-1500:]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    precision_of = lambda d: json.loads((d / "pruning.json").read_text())["precision"]  # noqa: E731
    assert precision_of(tmp_path / "out") == precision_of(tmp_path / "ref")


def test_widths_rounded_to_32_after_a_rounded_neuron_count_pass_the_ratio_check():
    """A plan rounds its neurons per block, then the widths to --round-to: the two roundings may add up to just
    over half a width step (here 368 neurons a block, widths 656 -> 640), which is the plan's own granularity,
    not a missed request (it was refused, e.g. under a --target-speedup ratio)."""
    import copy

    from comprune import PruneConfig, prune
    from conftest import calib, tiny_model
    dense = tiny_model("llama", vocab=300, layers=4, inter=1024)
    cfg = PruneConfig(ratio=0.49185791015625, layer_share=0.5, round_to=32, batch_size=4)
    _, rep = prune(copy.deepcopy(dense), None, cfg, calibration=calib(8, 16), progress=False)
    assert all(w % 32 == 0 for w in rep.mlp_widths) and abs(rep.ratio_achieved - cfg.ratio) > 0.0108
