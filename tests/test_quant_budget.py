"""Budgets at the quantized GGUF types: importance matrices from calibration windows, --target-size at a mix,
and `comprune plan` by the frontier."""
import json

import gguf
import pytest
import torch

from comprune.export.gguf import export_gguf
from comprune.export.size import gguf_bytes
from conftest import tiny_model
from test_gguf import VOCAB, prune_to_size, save
from test_quant import TOL, T, _check, needs_llamacpp


@needs_llamacpp
def test_imatrix_export_and_cache(tmp_path):
    """An importance matrix from calibration windows: collected on the model, cached beside it by the windows'
    sha256 (not collected again), and the export quantizes with it (q4_0's first ffn_down layers become q4_1, as
    in llama.cpp), still running in llama.cpp as transformers does on the dequantized weights."""
    from comprune.export import imatrix as im
    model = tiny_model("llama", layers=8, hidden=256, inter=256, vocab=VOCAB)
    src = save(model, tmp_path / "m")
    windows = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    got = im.imatrix_for(src, windows, model=model)
    assert got["blk.0.attn_q.weight"].shape == (256,) and got["blk.3.ffn_down.weight"].shape == (256,)
    assert (got["blk.0.attn_q.weight"] > 0).all() and "token_embd.weight" in got  # tied: the head's input
    assert len(list((src / im.CACHE).glob("*.safetensors"))) == 1
    again = im.imatrix_for(src, windows, model=None)  # from the cache: no model to load
    assert all((again[k] == v).all() for k, v in got.items())
    info = export_gguf(src, tmp_path / "m.gguf", "q4_0", imatrix=got)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(info["path"]).tensors}
    assert types["blk.0.ffn_down.weight"] == T.Q4_1 and types["blk.1.ffn_down.weight"] == T.Q4_0
    assert info["bytes"] == gguf_bytes(src, "q4_0", imatrix=True)
    _check(model, src, info["path"], TOL[256])
    from comprune.errors import CompruneError
    with pytest.raises(CompruneError, match="not f16"):
        export_gguf(src, tmp_path / "f.gguf", "f16", imatrix=got)


def test_prune_to_target_size_at_a_quantized_type(tmp_path, capsys, qtype="q4_k_m"):
    """--target-size at a mix: the pruned model's file at that type is within the target and not far under,
    counting that a pruned ffn_down falls back from the K-quant blocks its dense width filled."""
    src = save(tiny_model("llama", vocab=VOCAB, layers=4, inter=1024), tmp_path / "m")
    dense = gguf_bytes(src, qtype)
    target = int(dense * 0.75)
    out = tmp_path / "p"
    rec = prune_to_size(src, out, target, qtype)
    got = export_gguf(out, tmp_path / "p.gguf", qtype)
    assert rec["gguf_bytes"] == got["bytes"] <= target and rec["met"]
    assert got["bytes"] > 0.85 * target  # not far under either
    # `comprune export` quantizes a pruned model with the importance matrix of its own calibration by default
    from comprune.cli import main
    capsys.readouterr()
    for flag, used in (([], True), (["--no-imatrix"], False)):
        assert main(["export", str(out), "--gguf", str(tmp_path / f"{used}.gguf"), "--type", qtype, "--json",
                     *flag]) == 0
        assert json.loads(capsys.readouterr().out)["imatrix"] is used
    assert len(list((out / "imatrix").glob("*.safetensors"))) == 1


def test_plan_by_the_frontier(tmp_path):
    """comprune plan: the (ratio, type) pairs within a size, measured quality where the frontier has it (and
    interpolated between its ratios), and the verdict whether quantization alone meets the budget with less
    loss; without a frontier, no quality is invented."""
    import json
    import subprocess
    import sys
    from comprune.budget.frontier import plan
    src = save(tiny_model("llama", vocab=VOCAB, layers=4, inter=1024), tmp_path / "m")
    q4 = gguf_bytes(src, "q4_k_m")
    pts = [{"method": "dense", "ratio": 0.0, "qtype": "f16", "ppl": 10.0, "gen_rel": 0.5},
           {"method": "dense", "ratio": 0.0, "qtype": "q4_k_m", "ppl": 10.5, "gen_rel": 1.0},
           {"method": "comp", "ratio": 0.1, "qtype": "q8_0", "ppl": 12.0},
           {"method": "comp", "ratio": 0.5, "qtype": "q8_0", "ppl": 20.0}]
    front = tmp_path / "f.json"
    front.write_text(json.dumps({"model": str(src), "points": pts}))
    out = plan(str(src), target_size=q4 + 1, frontier=front, types=["f16", "q8_0", "q4_k_m"])
    by = {c["qtype"]: c for c in out["candidates"]}
    assert by["q4_k_m"]["ratio"] == 0 and by["q4_k_m"]["ppl"] == 10.5 and by["q4_k_m"]["quality"] == "measured"
    assert 0.1 < by["q8_0"]["ratio"] < 0.5 and by["q8_0"]["quality"].startswith("interpolated")
    assert 12.0 < by["q8_0"]["ppl"] < 20.0 and by["q8_0"]["gguf_bytes"] <= q4 + 1
    assert by["q4_k_m"]["speedup_vs_f16"] == 2.0 and by["q4_k_m"]["speed"] == "measured"
    assert "f16" not in by or by["f16"]["ppl"] is None  # f16 needs a prune not measured
    assert out["verdict"].startswith("quantization alone meets it with less loss: the dense model at q4_k_m")
    bare = plan(str(src), target_size=int(q4 * 0.8), types=["q8_0", "q4_k_m"])
    assert all(c["ppl"] is None and c["ratio"] > 0 for c in bare["candidates"])
    assert bare["verdict"].startswith("quantization alone does not meet it")
    assert "nothing meets this budget" in plan(str(src), target_size="1kB", types=["q4_k_m"])["verdict"]
    r = subprocess.run([sys.executable, "-m", "comprune.cli", "plan", str(src), "--target-size", str(q4 + 1),
                        "--frontier", str(front), "--types", "q8_0", "q4_k_m", "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["verdict"] == plan(str(src), target_size=q4 + 1, frontier=front,
                                                   types=["q8_0", "q4_k_m"])["verdict"]


def test_plan_refusals_are_one_line(tmp_path, capsys):
    from comprune.cli import main
    src = save(tiny_model("llama", vocab=VOCAB, layers=2), tmp_path / "m")
    capsys.readouterr()
    for args, needle in (([str(src)], "give one of"), ([str(src), "--target-size", "1MB", "--target-speedup", "2"],
                                                         "give one of"),
                         ([str(src), "--target-speedup", "0.5"], "must be above 1"),
                         ([str(src), "--target-size", "1MB", "--frontier", str(tmp_path / "no.json")], "not found")):
        assert main(["plan", *args]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
