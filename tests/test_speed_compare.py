"""The comparison's speed and zero-shot additions: the llama.cpp column (timed, or skipped with a note), zero-shot
task by task (resumable, full sets as their own stage), standard errors and paired per-example tests."""
import json
import random

import pytest

from comprune import deferred
from comprune.compare import Comparison
from comprune.compare import llamacpp as compare_llamacpp
from comprune.compare import runner
from comprune.compare.report import write_reports
from comprune.evaluate.significance import average_stderr, compare_runs, mcnemar, paired_bootstrap
from comprune.evaluate.zeroshot import PAPER7
from conftest import tiny_model
from test_stream import _tokenizer


def test_mcnemar_counts_discordant_pairs_and_exact_p():
    r = mcnemar("1100110", "1000011")
    assert (r["only_a"], r["only_b"], r["n"]) == (2, 1, 7)
    assert r["p"] == pytest.approx(1.0)  # 2 vs 1 discordant: nowhere near significant
    r = mcnemar("1" * 20 + "0" * 5, "0" * 20 + "0" * 5)
    assert r["only_a"] == 20 and r["p"] == pytest.approx(2 * 0.5 ** 20, rel=1e-3)


def test_paired_bootstrap_tells_equal_from_different():
    rng = random.Random(0)
    a = {t: "".join(rng.choice("01") for _ in range(300)) for t in ("x", "y")}
    same = paired_bootstrap(a, dict(a), iters=500)
    assert same["diff"] == 0 and same["p"] == 1.0
    worse = {t: "".join("0" if c == "1" and rng.random() < 0.3 else c for c in s) for t, s in a.items()}
    d = paired_bootstrap(a, worse, iters=500)
    assert d["diff"] > 0.05 and d["p"] < 0.01 and d["ci95"][0] > 0
    assert average_stderr([0.03, 0.04]) == pytest.approx(0.025)


@pytest.fixture
def tiny_dir(tmp_path):
    d = tmp_path / "tiny"
    tiny_model("llama", layers=4).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return d


def _fake_task(task, n=50, seed=0):
    rng = random.Random(f"{task}{seed}")
    correct = "".join(rng.choice("01") for _ in range(n))
    acc = correct.count("1") / n
    metric = "acc_norm" if task in ("hellaswag", "arc_challenge", "openbookqa") else "acc"
    return {metric: acc, f"{metric}_stderr": (acc * (1 - acc) / (n - 1)) ** 0.5, "metric": metric, "n": n,
            "doc_ids": "all", "correct": correct}


def test_zeroshot_full_is_resumable_per_task(tiny_dir, tmp_path, monkeypatch):
    calls = []

    def fake(model, tok, tasks, subset=None, **kw):
        (task,) = tasks
        if len(calls) == 3 and not any(c[0] == "boom" for c in calls):
            calls.append(("boom", subset))
            raise RuntimeError("killed")
        calls.append((task, subset))
        assert kw["per_example"] is True
        return {"tasks": {task: _fake_task(task)}, "harness_version": "x", "subset": subset, "seconds": 1.0}
    monkeypatch.setattr(runner, "evaluate_zeroshot", fake)
    cmp = Comparison(str(tiny_dir), [0.2], ["layer-drop"], tmp_path / "cmp", zeroshot_full=True, progress=False,
                     data_dir=str(tmp_path))
    assert ("dense", "zeroshot_full") in cmp.plan() and cmp.plan()[-1][1] == "zeroshot_full"
    cmp.step("dense", "zeroshot_full")  # fails at the 4th task: the first three are kept
    rec = json.loads(cmp.run_path("dense").read_text())
    assert set(rec["zeroshot_full"]["tasks"]) == set(PAPER7[:3]) and "zeroshot_full" in rec["errors"]
    assert rec["zeroshot_full"]["average"] is None  # three tasks of seven are no seven-task average
    cmp.step("dense", "zeroshot_full")  # resumes: only the missing tasks, on the full sets
    assert [c for c in calls if c[0] != "boom"] == [(t, None) for t in PAPER7]
    rec = json.loads(cmp.run_path("dense").read_text())
    assert set(rec["zeroshot_full"]["tasks"]) == set(PAPER7) and not rec.get("errors")
    assert rec["zeroshot_full"]["average_stderr"] > 0
    assert not cmp.needed("dense", "zeroshot_full", rec)


def _run(out, name, **rec):
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{name}.json").write_text(json.dumps(rec))


def test_report_has_llamacpp_column_stderr_and_paired_tests(tmp_path):
    out = tmp_path / "cmp"
    settings = {"model": "m", "ratios": [0.2], "methods": ["comp", "flap"], "calib": "c4", "nsamples": 8,
                "seqlen": 32, "seed": 0, "ppl_seqlens": [128], "ppl_max_tokens": 1024, "full_ratio": None,
                "zeroshot_ratio": 0.2, "zeroshot_tasks": "paper7", "zeroshot_subset": 200, "zeroshot_full": True}
    full = lambda seed: {"tasks": {t: _fake_task(t, seed=seed) for t in PAPER7}, "average": 0.5}  # noqa: E731
    _run(out, "dense", method="dense", ratio=0.0, zeroshot_full=full(0))
    _run(out, "comp-r0.20", method="comp", ratio=0.2, zeroshot_full=full(1), prune={"params_after": 10},
         llamacpp={"prompt_relative": 1.31, "gen_relative": 1.22, "arch": "deci", "reference_prompt_tok_s": 300.0,
                   "reference_gen_tok_s": 60.0})
    _run(out, "flap-r0.20", method="flap", ratio=0.2, zeroshot_full=full(2), prune={"params_after": 10},
         llamacpp={"skipped": "no GGUF/llama.cpp measurement: unsupported"})
    res = write_reports(out, settings)
    md = (out / "results.md").read_text()
    header = md.splitlines()[0]
    assert "gen tok/s vs dense" in header and "llama.cpp prompt / gen tok/s vs dense" in header
    assert "1.31× / 1.22× (deci)" in md and "- (skipped†)" in md and "unsupported" in md
    assert "7-task avg, full sets (%)" in header and " ± " in md
    pairs = {(t["a"], t["b"]) for t in res["zeroshot_tests"]}
    assert pairs == {("comp", "dense"), ("flap", "dense"), ("comp", "flap")}
    t = next(t for t in res["zeroshot_tests"] if (t["a"], t["b"]) == ("comp", "dense"))
    assert set(t["tasks"]) == set(PAPER7) and 0 <= t["average"]["p"] <= 1
    assert "Paired tests" in md


def test_tests_need_the_same_examples():
    a = {"piqa": {"correct": "0101", "doc_ids": [1, 2, 3, 4]}}
    assert compare_runs(a, {"piqa": {"correct": "0111", "doc_ids": [1, 2, 3, 5]}}) is None
    assert compare_runs(a, {"piqa": {"acc": 0.5}}) is None  # an older record without per-example results


def test_llamacpp_column_skips_cleanly(tmp_path, monkeypatch):
    def missing():
        raise ImportError("no xllamacpp")
    monkeypatch.setattr(deferred, "xllamacpp", missing)
    rec = compare_llamacpp.llamacpp_speed(object(), "comp-r0.20", tmp_path, None)
    assert set(rec) == {"skipped"} and "pip install xllamacpp" in rec["skipped"]


def test_llamacpp_speed_pair_on_a_tiny_export(tmp_path):
    pytest.importorskip("xllamacpp")
    from _reliability import export_ready
    from comprune.export.gguf import export_gguf
    from comprune.export.llamacpp import relative_llamacpp_speed
    d = export_ready(tmp_path / "m", layers=2)
    path = tmp_path / "m.gguf"
    export_gguf(d, path, "f16")
    r = relative_llamacpp_speed(path, path, list(range(5, 37)), new_tokens=4, repeats=1, threads=1)
    assert r["prompt_tokens"] == 32 and r["new_tokens"] == 4
    assert r["prompt_tok_s"] > 0 and r["gen_tok_s"] > 0 and r["prompt_relative"] > 0 and r["gen_relative"] > 0


def test_per_example_results_match_the_harness_score():
    pytest.importorskip("lm_eval")
    from comprune.data import resolve_data_dir
    from comprune.errors import CompruneError
    try:
        resolve_data_dir()
    except CompruneError:
        pytest.skip("shared/data not found")
    from comprune.evaluate.zeroshot import evaluate_zeroshot, subset_indices
    from test_zeroshot import model_and_tok
    model, tok = model_and_tok.__wrapped__()
    r = evaluate_zeroshot(model, tok, ["arc_challenge"], subset=6, progress=False, per_example=True)
    t = r["tasks"]["arc_challenge"]  # acc_norm: the paper metric is the one kept per example
    assert t["doc_ids"] == subset_indices(1172, 6) and len(t["correct"]) == 6
    assert t["correct"].count("1") / 6 == pytest.approx(t["acc_norm"])


def test_presets_compare_as_methods_and_full_test_lengths(tiny_dir, tmp_path):
    """A preset (comp-search) is a method of the comparison, pruned with `--preset` and streamed as its method
    (comp) is; --full-seqlens limits the full-test-set stage to those window lengths."""
    from comprune.compare.measure import prune_command
    from comprune.errors import CompruneError
    cmp = Comparison(str(tiny_dir), ratios=(0.2,), methods=("comp", "comp-search"), out_dir=tmp_path / "c",
                     full_seqlens=(2048,), progress=False)
    cmd = prune_command(cmp, "comp-search", 0.2, tmp_path / "m")
    assert cmd[cmd.index("--preset") + 1] == "comp-search" and "--method" not in cmd
    assert prune_command(cmp, "comp", 0.2, tmp_path / "m")[5:7] == ["--method", "comp"]
    rec = {"method": "comp-search", "ratio": 0.2, "prune": {}}
    assert cmp.needed("comp-search-r0.20", "stream", rec)
    assert prune_command(cmp, "comp-search", 0.2, tmp_path / "m", stream=True)[-1] == "--stream"
    assert cmp.needed("comp-r0.20", "stream", {"method": "comp", "ratio": 0.2, "prune": {}})
    # a finished streamed record is measured again only under --redo stream, once per tag
    from comprune.compare.records import RSS_PROBE, STREAM_RECORD
    done = {"method": "comp-search", "ratio": 0.2, "prune": {},
            "stream": {"rss_probe": RSS_PROBE, "record_version": STREAM_RECORD}}
    assert not cmp.needed("comp-search-r0.20", "stream", done)
    again = Comparison(str(tiny_dir), ratios=(0.2,), methods=("comp-search",), out_dir=tmp_path / "c",
                       redo=("stream",), redo_tag="t", progress=False)
    assert again.needed("comp-search-r0.20", "stream", done)
    assert not again.needed("comp-search-r0.20", "stream", {**done, "stream": {**done["stream"], "redo_tag": "t"}})
    assert cmp.needed("comp-r0.20", "full", {"ppl": {"wikitext2@128/full": {}}})
    assert not cmp.needed("comp-r0.20", "full", {"ppl": {"wikitext2@2048/full": {}}})
    with pytest.raises(CompruneError, match="full-seqlens"):
        Comparison(str(tiny_dir), methods=("comp",), out_dir=tmp_path / "d", full_seqlens=(4096,))
    with pytest.raises(CompruneError, match="unknown method"):
        Comparison(str(tiny_dir), methods=("comp-fast",), out_dir=tmp_path / "d")


def test_report_of_a_run_with_some_zeroshot_tasks_done(tmp_path):
    """The report is rewritten after every task, so a run with only some tasks scored (no average yet) shows
    its tasks and '-' for the average instead of failing the comparison."""
    out = tmp_path / "cmp"
    settings = {"model": "m", "ratios": [0.2], "methods": ["comp"], "calib": "c4", "nsamples": 8,
                "seqlen": 32, "seed": 0, "ppl_seqlens": [128], "ppl_max_tokens": 1024, "full_ratio": None,
                "zeroshot_ratio": 0.2, "zeroshot_tasks": "paper7", "zeroshot_subset": 200, "zeroshot_full": False}
    _run(out, "dense", method="dense", ratio=0.0,
         zeroshot={"tasks": {t: _fake_task(t, seed=0) for t in PAPER7}, "average": 0.5})
    _run(out, "comp-r0.20", method="comp", ratio=0.2, prune={"params_after": 10},
         zeroshot={"tasks": {"boolq": _fake_task("boolq", seed=1)}, "average": None})
    write_reports(out, settings)
    row = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("| comp | 0.20 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[-2:] == ["-", "-"] and cells[2:].count("-") == len(PAPER7) - 1 + 2, row
