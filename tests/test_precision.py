"""--dtype auto: the probe decides (mocked here: the test host's own speed must not change the answer), and the
precision that ran is recorded in every manifest and result; saved weights keep the source's precision."""
import json

import pytest
import torch
from safetensors import safe_open

from comprune import load, precision
from comprune.evaluate.hardware import against_peak, flops_per_token
from conftest import tiny_model
from test_stream import _tokenizer

FLOOR = precision.PROBE_MIN_FLOP  # before any fixture lowers it


@pytest.fixture
def mock_cpu(monkeypatch):
    """mock_cpu(flags, bf16_gflops): the CPU's bf16 flags and the probe's rates (float32 at 100 GFLOP/s)."""
    calls = []

    def setup(flags, bf16):
        monkeypatch.setattr(precision, "native_bf16", lambda flags_=None: list(flags))
        monkeypatch.setattr(precision, "PROBE_MIN_FLOP", 0)  # the tiny test model is probed like a real one

        def probe(dtype, shape=precision.PROBE_SHAPE, device="cpu", seconds=0.1):
            calls.append((dtype, tuple(shape), torch.get_num_threads()))
            return {torch.float32: 100.0, torch.bfloat16: bf16}[dtype]
        monkeypatch.setattr(precision, "matmul_gflops", probe)
        return calls
    return setup


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("precision") / "m"
    tiny_model("llama", layers=4).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def test_auto_is_float32_where_bf16_is_slow(mock_cpu):
    calls = mock_cpu(["avx512_bf16"], bf16=0.9)
    choice = precision.choose("cpu", {"hidden_size": 64, "intermediate_size": [128, 96]})
    assert choice.dtype == "float32" and "float32 kept" in choice.reason
    assert {c[1] for c in calls} == {(128, 64, 128)}  # the model's own shapes (the widest MLP)


def test_auto_is_bfloat16_where_bf16_is_fast(mock_cpu):
    mock_cpu(["amx_bf16"], bf16=500.0)
    choice = precision.choose("cpu")
    assert choice.dtype == "bfloat16" and choice.probe_gflops == {"float32": 100.0, "bfloat16": 500.0}


def test_auto_probes_on_one_thread_and_restores_the_count(mock_cpu):
    """The choice probes single-threaded (a second process on the cores stalls a multi-threaded matmul in either
    precision alike, and float32 was wrongly kept under load); the thread count is restored after."""
    calls = mock_cpu(["amx_bf16"], bf16=500.0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        precision.choose("cpu")
        assert {c[2] for c in calls} == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_auto_never_probes_emulated_bf16(mock_cpu):
    calls = mock_cpu([], bf16=500.0)  # flags say emulated: even a (mocked) fast probe is not consulted
    assert precision.choose("cpu").dtype == "float32" and calls == []


def test_auto_keeps_float32_for_matmuls_too_small_to_time(mock_cpu, monkeypatch):
    """Below the probe's floor the two rates are call overhead: the choice must not depend on them (two runs of
    one command would otherwise write different bytes), and float32 is kept without probing."""
    calls = mock_cpu(["amx_bf16"], bf16=500.0)
    monkeypatch.setattr(precision, "PROBE_MIN_FLOP", FLOOR)
    choice = precision.choose("cpu", {"hidden_size": 64, "intermediate_size": 256})
    assert choice.dtype == "float32" and calls == [] and "too small" in choice.reason
    assert precision.choose("cpu", {"hidden_size": 576, "intermediate_size": 1536}).dtype == "bfloat16"


def test_real_probe_is_short_and_cached():
    shape = (8, 32, 48)
    rate = precision.matmul_gflops(torch.float32, shape, seconds=0.01)
    assert rate > 0 and precision.matmul_gflops(torch.float32, shape, seconds=0.01) == rate
    m, k, n = precision.probe_shape({"hidden_size": 4096, "intermediate_size": 14336})
    assert k == 4096 and 2 * m * k * n <= precision.PROBE_MAX_FLOP  # an emulated bf16 still answers in < 1 s


@pytest.mark.parametrize("bf16,expect", [(0.9, torch.float32), (500.0, torch.bfloat16)])
def test_load_auto_records_precision(mock_cpu, model_dir, bf16, expect):
    mock_cpu(["amx_bf16"], bf16)
    model, _ = load(model_dir, dtype="auto")
    assert next(model.parameters()).dtype == expect
    rec = model.comprune_precision
    assert rec["dtype"] == str(expect).removeprefix("torch.") and rec["requested"] == "auto"
    assert rec["source_dtype"] == "float32"


def _dtypes(d):
    with safe_open(str(next(d.glob("*.safetensors"))), "pt") as h:
        return {h.get_slice(k).get_dtype() for k in h.keys()}


def test_prune_manifest_records_precision_and_saves_source_dtype(mock_cpu, model_dir, tmp_path, capsys):
    from comprune.cli import main
    mock_cpu(["amx_bf16"], bf16=500.0)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join("abc defg hij klmnop qrs tuv wxyz"[i % 7:] for i in range(400)))
    args = ["prune", str(model_dir), "--ratio", "0.3", "--layer-share", "0.5", "--nsamples", "4", "--seqlen", "32",
            "--calib", str(text), "--json"]
    assert main(args + ["--out", str(tmp_path / "src")]) == 0  # default --dtype auto, --save-dtype source
    out = json.loads(capsys.readouterr().out)
    manifest = json.loads((tmp_path / "src" / "pruning.json").read_text())
    for rec in (out["precision"], manifest["precision"]):
        assert rec["dtype"] == "bfloat16" and rec["requested"] == "auto" and rec["saved_dtype"] == "float32"
    assert "probe_gflops" not in manifest["precision"]  # timings vary: the same prune gives the same manifest
    assert _dtypes(tmp_path / "src") == {"F32"}
    assert json.loads((tmp_path / "src" / "config.json").read_text())["dtype"] == "float32"
    assert main(args + ["--out", str(tmp_path / "bf"), "--save-dtype", "compute"]) == 0
    assert json.loads((tmp_path / "bf" / "pruning.json").read_text())["precision"]["saved_dtype"] == "bfloat16"
    assert _dtypes(tmp_path / "bf") == {"BF16"}


def test_streamed_prune_in_auto_precision_saves_the_source_dtype(mock_cpu, model_dir, tmp_path):
    from comprune import PruneConfig, prune_streaming
    from test_stream import calib
    mock_cpu(["amx_bf16"], bf16=500.0)
    rep = prune_streaming(model_dir, tmp_path / "out", PruneConfig(ratio=0.3, layer_share=0.5, batch_size=4),
                          calibration=calib(), progress=False, dtype="auto")
    man = json.loads((tmp_path / "out" / "pruning.json").read_text())
    for rec in (rep.precision, man["precision"]):
        assert rec["dtype"] == "bfloat16" and rec["requested"] == "auto" and rec["saved_dtype"] == "float32"
    # staged (pruned) blocks computed in bf16 and copied tensors alike are written in float32
    files = list((tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 1 and all(_dtypes_of(f) == {"F32"} for f in files)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def _dtypes_of(path):
    with safe_open(str(path), "pt") as h:
        return {h.get_slice(k).get_dtype() for k in h.keys()}


def test_eval_json_records_precision_and_peak(mock_cpu, model_dir, tmp_path, capsys):
    from comprune.cli import main
    mock_cpu([], bf16=0.5)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40)
    assert main(["eval", str(model_dir), "--ppl", str(text), "--seqlen", "32,64", "--max-tokens", "256",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["seqlen"] for r in out] == [32, 64]
    for r in out:
        assert r["precision"]["dtype"] == r["dtype"] == "float32"
        hw = r["hardware"]
        assert hw["peak_gflops"] == 100.0 and hw["attn_implementation"] == "sdpa"
        assert hw["fraction_of_peak"] == pytest.approx(hw["achieved_gflops"] / 100.0, rel=1e-3)


def test_flops_per_token_counts_linears_and_causal_attention():
    model = tiny_model("llama", layers=3, hidden=64, inter=128, heads=4, kv_heads=2, vocab=256)
    d, kv = 64, 32  # q/o: 64 x 64, k/v: 32 x 64 (2 of 4 heads' width), tied head: 256 x 64 counted once
    linear = 3 * (2 * d * d + 2 * kv * d + 3 * d * 128) + 256 * d
    assert flops_per_token(model, 127) == 2 * linear + 3 * 4 * d * 64
    rec = against_peak(model, tokens_per_second=1000.0, seqlen=127)
    assert rec["achieved_gflops"] == pytest.approx(flops_per_token(model, 127) * 1000 / 1e9, abs=0.01)


@pytest.mark.parametrize("loaded,save,expect", [("bfloat16", "source", "F32"), ("float32", "bfloat16", "BF16")])
def test_saving_in_another_precision_leaves_the_model_as_it_was(model_dir, tmp_path, loaded, save, expect):
    from comprune import save_pretrained
    model, tok = load(model_dir, dtype=loaded)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    save_pretrained(model, tok, tmp_path / "out", dtype=save)
    assert _dtypes(tmp_path / "out") == {expect}
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == {"F32": "float32", "BF16": "bfloat16"}[expect]
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert all(torch.equal(b, buffers[k]) and b.dtype == buffers[k].dtype for k, b in model.named_buffers())
    again, _ = load(tmp_path / "out", dtype=loaded)  # what was written is the model, to the saved precision
    ids = torch.randint(0, 90, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = again(ids).logits.float(), model(ids).logits.float()
    if expect == "F32":  # bf16 -> float32 -> bf16 is exact
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
