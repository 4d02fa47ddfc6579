"""Reliability matrix, part 1: bad arguments x commands (prune, prune --stream, eval, export, compare).

Every bad argument gets exit code 2 and one line `comprune: error: ...` naming the problem and the fix, before
any work is done, and nothing is left on disk. Reliability audit (docs/reliability.md) items 6, 7, 12
(uncreatable --out), 15, 16, 17 and the minor list (--force on a foreign directory, a missing COMPRUNE_DATA, a directory as --calib / --ppl)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _reliability import assert_clean_error, export_ready, calib_text, main, prune_args, siblings, tiny_dir


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("args")
    src = tiny_dir(root / "tiny")
    text = calib_text(root / "calib.txt")
    return src, text


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A tiny llama with a byte-level BPE tokenizer: exportable to GGUF."""
    return export_ready(tmp_path_factory.mktemp("bpe") / "m", layers=2)


# ------------------------------------------------------------------------------ float options: NaN and inf (15)
PRUNE_FLOATS = ["--ratio", "--layer-share", "--damp", "--ridge", "--head-share", "--target-mix"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("opt", PRUNE_FLOATS)
@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_prune_rejects_non_finite_floats(env, tmp_path, capsys, opt, value, stream):
    src, text = env
    out = tmp_path / "out"
    code, err = main(prune_args(src, out, text, f"{opt}={value}", *(["--stream"] if stream else [])), capsys)
    line = assert_clean_error(code, err)
    assert opt in line or opt[2:].replace("-", "_") in line, line
    assert not siblings(out), siblings(out)


@pytest.mark.parametrize("args", [["--ratios", "nan"], ["--full-ratio", "nan"], ["--zeroshot-ratio", "inf"],
                                  ["--ratios", "0.2,inf"]])
def test_compare_rejects_non_finite_floats(env, tmp_path, capsys, args):
    src, _ = env
    code, err = main(["compare", src, "--methods", "comp", "--out", tmp_path / "cmp", "--skip",
                      "prune,ppl,speed,stream,zeroshot,full", *args], capsys)
    assert_clean_error(code, err, args[0].lstrip("-").split("-")[0])


COMPARE_NO_WORK = ["--methods", "layer-drop", "--skip", "prune,ppl,speed,stream,zeroshot,full,llamacpp"]


@pytest.mark.parametrize("args", [["--ratios", "nan", "--json"], ["--ratios", "0"], ["--ratios", "0.95"],
                                  ["--ratios", "-0.1"], ["--ratios", "0.2", "--stream-ratios", "nan"],
                                  ["--ratios", "0.2", "--stream-ratios", "1.5"]])
def test_compare_refuses_ratios_out_of_range(env, tmp_path, capsys, args):
    src, _ = env
    out = tmp_path / "cmp"
    code, err = main(["compare", src, "--out", out, *COMPARE_NO_WORK, *args], capsys)
    assert_clean_error(code, err, args[-3] if args[-1] == "--json" else args[-2], "(0, 0.9]")
    assert not out.exists()


def test_compare_out_is_a_file(env, tmp_path, capsys):
    src, _ = env
    out = tmp_path / "cmp"
    out.write_text("mine")
    code, err = main(["compare", src, "--out", out, "--ratios", "0.2", *COMPARE_NO_WORK], capsys)
    assert_clean_error(code, err, str(out), "not a directory")
    assert out.read_text() == "mine"


# ------------------------------------------------------------------------------ --round-to (6)
def test_round_to_larger_than_the_widths_is_refused(env, tmp_path, capsys):
    src, text = env
    out = tmp_path / "out"
    code, err = main(prune_args(src, out, text, "--round-to", "100000"), capsys)
    assert_clean_error(code, err, "round-to")
    assert not siblings(out)


def test_achieved_ratio_matches_the_request(env, tmp_path, capsys):
    """A prune that exits 0 reached its ratio within 0.5 % (or its manifest says why not)."""
    src, text = env
    out = tmp_path / "out"
    code, err = main(prune_args(src, out, text, "--round-to", "16"), capsys)
    if code == 0:
        man = json.loads((out / "pruning.json").read_text())
        assert abs(man["ratio_achieved"] - man["ratio_requested"]) <= 0.005 or man.get("ratio_note"), man
    else:
        assert_clean_error(code, err, "ratio")


# ------------------------------------------------------------------------------ --out (12, 16, 17, --force)
@pytest.mark.parametrize("name", [".", ".."])
def test_out_is_cwd_or_parent(env, tmp_path, capsys, monkeypatch, name):
    src, _ = env
    work = tmp_path / "w" / "cwd"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = {p.name for p in work.parent.iterdir()} | {p.name for p in work.iterdir()}
    # the calibration file does not exist: an --out check made first is the one that must speak
    code, err = main(prune_args(src, name, tmp_path / "missing.txt", "--force"), capsys)
    assert_clean_error(code, err, "--out")
    assert {p.name for p in work.parent.iterdir()} | {p.name for p in work.iterdir()} == before


def test_long_out_name_works(env, tmp_path, capsys):
    src, text = env
    out = tmp_path / ("x" * 250)
    code, err = main(prune_args(src, out, text), capsys)
    assert code == 0, err[-2000:]
    assert (out / "pruning.json").is_file()
    assert siblings(out) == {out.name}


def test_out_name_too_long_is_refused_first(env, tmp_path, capsys):
    src, _ = env
    out = tmp_path / ("x" * 300)
    code, err = main(prune_args(src, out, tmp_path / "missing.txt"), capsys)
    assert_clean_error(code, err, "--out")


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_uncreatable_out_is_refused_first(env, tmp_path, capsys, where, stream):
    src, _ = env
    if where == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    else:
        out = Path("/proc/comprune-no-such-dir/out")
    code, err = main(prune_args(src, out, tmp_path / "missing.txt", *(["--stream"] if stream else [])), capsys)
    assert_clean_error(code, err, "--out")


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_force_only_replaces_a_comprune_output(env, tmp_path, capsys, stream):
    src, text = env
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    code, err = main(prune_args(src, out, text, "--force", *(["--stream"] if stream else [])), capsys)
    assert_clean_error(code, err, "--force")
    assert (out / "thesis.txt").read_text() == "years of work"
    # a previous comprune output (it holds pruning.json) is replaced
    (out / "thesis.txt").unlink()
    (out / "pruning.json").write_text("{}")
    code, err = main(prune_args(src, out, text, "--force", *(["--stream"] if stream else [])), capsys)
    assert code == 0, err[-2000:]
    assert json.loads((out / "pruning.json").read_text())["method"] == "comp"


# ------------------------------------------------------------------------------ data arguments (minor list)
def test_missing_comprune_data_is_an_error(env, tmp_path, capsys, monkeypatch):
    src, _ = env
    monkeypatch.setenv("COMPRUNE_DATA", str(tmp_path / "nope"))
    code, err = main(["eval", src, "--ppl", "wikitext2", "--seqlen", "32", "--max-tokens", "64"], capsys)
    assert_clean_error(code, err, "COMPRUNE_DATA")
    code, err = main(prune_args(src, tmp_path / "out", "c4"), capsys)
    assert_clean_error(code, err, "COMPRUNE_DATA")


@pytest.mark.parametrize("cmd", ["prune", "eval"])
def test_directory_as_text_file(env, tmp_path, capsys, cmd):
    src, _ = env
    d = tmp_path / "texts"
    d.mkdir()
    argv = prune_args(src, tmp_path / "out", d) if cmd == "prune" else ["eval", src, "--ppl", d, "--seqlen", "32"]
    code, err = main(argv, capsys)
    assert_clean_error(code, err, "directory")


@pytest.mark.parametrize("args,needle", [(["--seqlen", "0"], "seqlen"), (["--seqlen", "x"], "integers"),
                                         (["--max-tokens", "0"], "max-tokens"), (["--batch-size", "0"], "batch")])
def test_eval_bad_numbers(env, tmp_path, capsys, args, needle):
    src, _ = env
    text = calib_text(tmp_path / "t.txt")
    code, err = main(["eval", src, "--ppl", text, "--seqlen", "32", *args], capsys)
    assert_clean_error(code, err, needle)


# ------------------------------------------------------------------------------ export (7)
def test_export_never_overwrites_without_force(bpe_model, tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    code, err = main(["export", bpe_model, "--gguf", precious], capsys)
    assert_clean_error(code, err, "--force")
    assert precious.read_text() == "keep me"
    code, err = main(["export", bpe_model, "--gguf", precious, "--force"], capsys)
    assert code == 0, err
    assert precious.read_bytes()[:4] == b"GGUF"


def test_export_to_a_directory(bpe_model, tmp_path, capsys):
    d = tmp_path / "adir"
    d.mkdir()
    code, err = main(["export", bpe_model, "--gguf", d], capsys)
    assert_clean_error(code, err, "directory")
    code, err = main(["export", bpe_model, "--gguf", d, "--force"], capsys)
    assert_clean_error(code, err, "directory")
    assert d.is_dir() and not list(d.iterdir()) and siblings(d) == {d.name}


def test_export_under_a_file(bpe_model, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, err = main(["export", bpe_model, "--gguf", tmp_path / "f" / "m.gguf"], capsys)
    assert_clean_error(code, err, "--gguf")

