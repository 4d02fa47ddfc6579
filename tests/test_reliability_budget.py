"""Reliability matrix, part 4: budgets in speed, late refusals and machine-readable output.

A latency cache that is corrupt or incomplete is measured again; a speed target on a family llama.cpp cannot run
is refused before any work; no file comprune writes holds NaN or Infinity (strict JSON readers refuse them);
with --json every exit prints one JSON object on stdout; an input too short for what is asked of it is refused
before the walk. Reliability audit (docs/reliability.md) items 2-6 of the second pass."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from _reliability import assert_clean_error, calib_text, main, tiny_dir

NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def strict_loads(text: str):
    """A strict JSON parser: NaN, Infinity and -Infinity are errors."""
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    return tiny_dir(root / "tiny"), calib_text(root / "calib.txt")


# ------------------------------------------------------------------------------ strict JSON in every file (4)
def _manifest(tmp_path, obj):
    from comprune.io import write_manifest
    write_manifest(tmp_path / "pruning.json", obj)
    return (tmp_path / "pruning.json").read_text()


def _records(tmp_path, obj):
    from comprune.compare.records import write_json
    write_json(tmp_path / "run.json", obj)
    return (tmp_path / "run.json").read_text()


def _report(tmp_path, obj):
    """A PruneReport's detail through save_pretrained's manifest."""
    from comprune.io import write_manifest
    from comprune.prune import PruneReport
    report = PruneReport("comp", 0.3, 0.3, 10, 7, [], [0], [4], 0.0, 0.0, {}, {}, {}, layer_scores=[math.nan],
                         details=obj)
    write_manifest(tmp_path / "pruning.json", report.to_dict())
    return (tmp_path / "pruning.json").read_text()


@pytest.mark.parametrize("writer", [_manifest, _records, _report])
def test_no_nan_or_infinity_in_json_files(tmp_path, writer):
    obj = {"score": NONFINITE["nan"], "ppl": NONFINITE["inf"], "nested": [1.5, NONFINITE["-inf"], (2, 3)],
           "ok": 0.25}
    got = strict_loads(writer(tmp_path, obj))
    if writer is _report:
        assert got["layer_scores"] == [None]
        got = got["details"]
    assert got["score"] is None and got["ppl"] is None and got["nested"] == [1.5, None, [2, 3]], got
    assert got["ok"] == 0.25


def test_finite_json_files_are_byte_identical(tmp_path):
    obj = {"b": [1.0, 2, (3, 4)], "a": {"x": 1e-30, "y": "z"}, "c": None, "d": True}
    assert _manifest(tmp_path, obj) == json.dumps(obj, indent=2, sort_keys=True) + "\n"
    assert _records(tmp_path, obj) == json.dumps(obj, indent=2, sort_keys=True) + "\n"


def test_resume_files_keep_non_finite_values_exactly(tmp_path):
    """A checkpoint and the search's state are strict JSON too, and a resume reads back the very values."""
    import importlib.util
    from types import SimpleNamespace
    from comprune.checkpoint import STATE, Checkpoint
    ckpt = Checkpoint(tmp_path / "ckpt", "f")
    ckpt.save(1, None, {"plan": {"costs": [0.5, NONFINITE["inf"]], "score": NONFINITE["nan"]}, "blocks": {}})
    strict_loads((tmp_path / "ckpt" / STATE).read_text())
    _, _, details = ckpt.load(None)
    assert details["plan"]["costs"] == [0.5, math.inf] and math.isnan(details["plan"]["score"])

    import comprune.methods.search as search
    spec = importlib.util.spec_from_file_location("optimiser", Path(search.__file__).parent / "optimiser.py")
    opt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(opt)

    class Fitness:  # every allocation scores inf: the parent never changes and its fitness is saved as it is
        removed_level, windows = 3, [0, 1]

        def population(self, kids, windows=None, parent=None, record=False):
            fits = [math.inf] * len(kids)
            return (fits, [None] * len(kids)) if record else fits
    cfg = SimpleNamespace(seed=0, search_time=0, search_generations=2, search_offspring=2, search_filter=1,
                          search_survivors=1)
    state = tmp_path / "search.json"
    _, trace = opt.evolve(Fitness(), {0: 1, 1: 1}, 2, cfg, state, show=False)
    strict_loads(state.read_text())
    cfg.search_generations = 3
    _, resumed = opt.evolve(Fitness(), {0: 1, 1: 1}, 2, cfg, state, show=False)
    assert resumed[:3] == trace == [[0, math.inf], [1, math.inf], [2, math.inf]]


# ------------------------------------------------------------------------------ a corrupt latency cache (2)
@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny llama whose MLPs (512) leave room for a speed target's widths in multiples of 32."""
    from _reliability import word_tokenizer
    from conftest import tiny_model
    d = tmp_path_factory.mktemp("wide") / "m"
    tiny_model("llama", layers=8, inter=512).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


def _table_path(cache: Path, src: Path) -> Path:
    import torch
    from comprune.export.latency import _key
    from comprune.files import read_config
    return cache / "latency" / f"{_key(read_config(src), 'f16', torch.get_num_threads())}.json"


@pytest.mark.parametrize("cached", ["{broken", '{"c": 0.5}', '{"c": "x", "a": 0.3, "m": 0.5, "qtype": "f16", '
                                    '"threads": 1, "cpu": "x", "points": []}', "[1, 2]", "", None])
def test_corrupt_latency_cache_is_measured_again(env, wide, tmp_path, capsys, monkeypatch, cached):
    """A cached latency table that is not JSON, not an object, or lacks a field is measured again (here a fake
    measurement: nothing is timed) and replaced; the prune goes on."""
    import comprune.export.latency as latency
    src, text = wide, env[1]
    monkeypatch.setenv("COMPRUNE_CACHE", str(tmp_path / "cache"))
    path = _table_path(tmp_path / "cache", src)
    if cached is not None:
        path.parent.mkdir(parents=True)
        path.write_text(cached)
    measured = []

    def fake_measure(src_, cfg, width_key, qtype, threads, show, prompt):
        measured.append(width_key)
        return {"c": 0.1, "a": 0.35, "m": 0.55, "qtype": qtype, "threads": threads, "cpu": "x",
                "points": [[1.0, 0.5, 0.8]], "runs": [], "version": latency.TABLE_VERSION, "spread": math.nan}
    monkeypatch.setattr(latency, "measure_table", fake_measure)
    out = tmp_path / "out"
    code, err = main(["prune", src, "--target-speedup", "1.2", "--layer-share", "0.5", "--nsamples", "4",
                      "--seqlen", "32", "--calib", text, "--out", out, "--json"], capsys)
    assert code == 0, err[-2000:]
    assert measured == ["intermediate_size"]
    table = strict_loads(path.read_text())  # replaced by the measured table, in strict JSON
    assert table["c"] == 0.1 and table["spread"] is None
    assert json.loads((out / "pruning.json").read_text())["target_speedup"]["predicted"] >= 1.2
    code, err = main(["prune", src, "--target-speedup", "1.2", "--layer-share", "0.5", "--nsamples", "4",
                      "--seqlen", "32", "--calib", text, "--out", tmp_path / "again", "--json"], capsys)
    assert code == 0 and measured == ["intermediate_size"], err[-2000:]  # the good table is used as it is


# ------------------------------------------------------------------------------ a speed target on OPT (3)
@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    from _reliability import word_tokenizer
    from conftest import tiny_model
    d = tmp_path_factory.mktemp("opt") / "opt"
    tiny_model("opt").save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("extra", [[], ["--ratio", "0.3", "--preset", "comp-search"]], ids=["speedup", "with-ratio"])
def test_target_speedup_on_opt_is_refused_first(env, opt_dir, tmp_path, capsys, monkeypatch, extra):
    """llama.cpp has no OPT architecture, so a llama.cpp speed is meaningless for it: one line, before any work
    (nothing measured, nothing loaded)."""
    import comprune.export.latency as latency
    import comprune.loading as loading
    _, text = env
    monkeypatch.setenv("COMPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(latency, "measure_table", lambda *a, **k: pytest.fail("measured a latency table"))
    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("loaded the model"))
    out = tmp_path / "out"
    code, err = main(["prune", opt_dir, "--target-speedup", "1.2", "--nsamples", "4", "--seqlen", "32", "--calib",
                      text, "--out", out, *extra], capsys)
    assert_clean_error(code, err, "--target-speedup", "llama.cpp has no OPT architecture", "--ratio")
    assert not out.exists()


def test_latency_widths_come_from_the_family_record(opt_dir):
    """The cache key reads the MLP width under the family's key (OPT: ffn_dim), not a hard-coded one."""
    from comprune.export.latency import _key
    from comprune.files import read_config
    cfg = read_config(opt_dir)
    assert "intermediate_size" not in cfg and _key(cfg, "f16", 1) != _key({**cfg, "ffn_dim": 1}, "f16", 1)


# ------------------------------------------------------------------------------ --json on every exit (5)
def _run(argv, capsys) -> tuple[int, str, str]:
    from comprune.cli import main as cli_main
    capsys.readouterr()
    try:
        code = cli_main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _prune(src, out, text, *extra):
    return ["prune", src, "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32", "--calib", text, "--out", out,
            "--json", *extra]


JSON_ERRORS = {  # name: (argv builder, needle in the error, from argparse)
    "search-generations": (lambda s, t, o: _prune(s, o, t, "--preset", "comp-search", "--search-generations", "-1"),
                           "search settings", False),
    "stream-nan": (lambda s, t, o: _prune(s, o, t, "--stream", "--layer-share", "nan"), "layer", False),
    "bad-choice": (lambda s, t, o: _prune(s, o, t, "--method", "nope"), "invalid choice", True),
    "bad-type": (lambda s, t, o: _prune(s, o, t, "--nsamples", "many"), "invalid int value", True),
    "missing-out": (lambda s, t, o: ["prune", s, "--json"], "--out", True),
    "abbreviated": (lambda s, t, o: ["prune", s, "--out", o, "--js", "--search-time", "soon"], "duration", True),
    "eval-missing": (lambda s, t, o: ["eval", o.parent / "nowhere", "--json"], "nowhere", False),
    "eval-bad-seqlen": (lambda s, t, o: ["eval", s, "--seqlen", "x", "--json"], "integers", False),
    "export-no-gguf": (lambda s, t, o: ["export", s, "--json"], "--gguf", False),
    "compare-nan": (lambda s, t, o: ["compare", s, "--methods", "comp", "--out", o, "--ratios", "nan", "--json",
                                     "--skip", "prune,ppl,speed,stream,zeroshot,full"], "ratios", False),
}


@pytest.mark.parametrize("case", list(JSON_ERRORS))
def test_json_errors_are_one_json_object(env, tmp_path, capsys, case):
    """With --json every failed run prints exactly one JSON object {"error", "fix"} on stdout (exit 2), and the
    one-line message on stderr."""
    src, text = env
    build, needle, usage = JSON_ERRORS[case]
    code, out, err = _run(build(src, text, tmp_path / "out"), capsys)
    assert code == 2, (code, err[-1500:])
    got = strict_loads(out)  # the whole of stdout is one object
    assert isinstance(got, dict) and set(got) == {"error", "fix"} and got["error"], got
    assert needle.lower() in (got["error"] + ": " + got["fix"]).lower(), got
    if usage:
        assert err.strip().splitlines()[-1].startswith("comprune") and ": error: " in err, err
    else:
        line = assert_clean_error(code, err)  # a message without ": " has no fix of its own: "fix" is ""
        assert line == f"comprune: error: {got['error']}" + (f": {got['fix']}" if got["fix"] else ""), (line, got)


# ------------------------------------------------------------------------------ late refusals (6)
@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_too_many_fitness_windows_is_refused_before_any_block(env, tmp_path, capsys, stream):
    """--search-nsamples beyond what the calibration text holds apart from its calibration windows: one line
    at once (the room is counted before any window is drawn; drawing until giving up took minutes), before the
    walk: no checkpoint, nothing beside --out."""
    import time
    from _reliability import siblings
    src, _ = env
    text = calib_text(tmp_path / "short.txt", words=9000)  # ~54 k tokens: room for ~3,300 windows of 16
    out = tmp_path / "out"
    t0 = time.monotonic()
    code, err = main(["prune", src, "--ratio", "0.3", "--preset", "comp-search", "--search-nsamples", "4000",
                      "--nsamples", "4", "--seqlen", "16", "--calib", text, "--out", out,
                      *(["--stream"] if stream else [])], capsys)
    elapsed = time.monotonic() - t0
    assert elapsed < 15, f"refused after {elapsed:.0f} s: {err[-500:]}"
    assert_clean_error(code, err, "too short for 4000 search windows", "room for at most", "--search-nsamples")
    assert "block" not in err.lower() and not siblings(out), (err, siblings(out))
