"""Quantized GGUF types (export.gguf_quant): llama.cpp's kernel writes them, llama.cpp's mix picks each tensor's
type, the predicted size is exact, and llama.cpp runs the file as transformers runs its dequantized weights."""
import copy
import importlib.util

import gguf
import pytest
import torch

from comprune.export.gguf import export_gguf
from comprune.export.gguf_quant import QUANT_TYPES, Mix, tensor_type
from comprune.export.gguf_read import load_dequantized, save_dequantized
from comprune.export.size import gguf_bytes
from conftest import tiny_model
from test_gguf import VOCAB, max_logprob_diff, nonuniform_llama, prompts, save

T = gguf.GGMLQuantizationType
needs_llamacpp = pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None,
                                    reason="xllamacpp (llama.cpp runtime and quantizer) not installed")
TYPES = list(QUANT_TYPES)
# Max |log p_llama.cpp - log p_transformers on the GGUF's dequantized weights| over the whole vocab. The weights
# are the same on both sides; what differs is llama.cpp quantizing the activations too (to q8_0 / q8_K blocks for
# its integer dot products) and its f16 KV cache: measured 0.15..0.24 on the hidden-256 llama below (logit std
# ~3), where the original weights differ by 1..4; 0.03..0.04 on the hidden-64 deci model (original: 0.05..0.6).
TOL = {256: 0.4, 64: 0.08}


def _check(model, src, path, tol, reload=False):
    """llama.cpp matches transformers on the dequantized weights, and better than on the original ones: the
    dequantized weights are what llama.cpp runs. `reload`: through a dequantized checkpoint (MoE layouts)."""
    if reload:
        from transformers import AutoModelForCausalLM
        out = save_dequantized(src, path, src.parent / (src.name + "-deq"))
        deq = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    else:
        deq = load_dequantized(copy.deepcopy(model), src, path)
    got = max_logprob_diff(deq, src, path, prompts(2))
    orig = max_logprob_diff(model, src, path, prompts(2))
    assert got < tol and got < orig, (got, orig)
    return got


@needs_llamacpp
@pytest.mark.parametrize("qtype", TYPES)
def test_uniform_llama_every_type(tmp_path, qtype):
    """Hidden size 256: the K-quants' blocks fit, so their mixes are the real ones; size predicted exactly."""
    model = tiny_model("llama", layers=4, hidden=256, inter=512, vocab=VOCAB)
    src = save(model, tmp_path / "m")
    info = export_gguf(src, tmp_path / "m.gguf", qtype)
    assert info["bytes"] == gguf_bytes(src, qtype)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(info["path"]).tensors}
    assert types["blk.1.attn_q.weight"] == QUANT_TYPES[qtype][0]
    assert types["token_embd.weight"] == T.Q6_K  # tied: the output's type
    print(f"uniform {qtype}: {info['tensor_types']} |dlogprob| {_check(model, src, info['path'], TOL[256]):.3f}")


@needs_llamacpp
@pytest.mark.parametrize("qtype", TYPES)
def test_deci_every_type(tmp_path, qtype):
    """Per-layer widths (`deci`), odd and removed MLPs, hidden 64: every K-quant tensor takes llama.cpp's
    fallback type; widths pad to 32 (pad_to=256 to whole K blocks)."""
    model = nonuniform_llama([128, 40, 0, 96, 7, 0])
    src = save(model, tmp_path / "m")
    info = export_gguf(src, tmp_path / "m.gguf", qtype)
    assert info["arch"] == "deci" and info["gguf_ffn_widths"] == [128, 64, 32, 96, 32, 32]
    assert info["bytes"] == gguf_bytes(src, qtype)
    assert not {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"} & set(info["tensor_types"])  # rows of 64
    _check(model, src, info["path"], TOL[64])
    padded = export_gguf(src, tmp_path / "p.gguf", qtype, pad_to=256)
    assert padded["gguf_ffn_widths"] == [256, 256, 32, 256, 256, 32]
    assert padded["bytes"] == gguf_bytes(src, qtype, pad_to=256) > info["bytes"]


FAMILIES = ["mistral", "qwen2", "qwen3", "smollm3", "gemma2", "gemma3_text", "granite", "olmo2", "phi3"]


@needs_llamacpp
@pytest.mark.parametrize("fam", FAMILIES + ["qwen3_moe", "mixtral", "olmoe"])
def test_every_family(tmp_path, fam):
    """Every family the export supports, at a K-quant mix and a 32-block type; hidden 256 (K blocks fit), the
    MoE families hidden 64 (their experts stacked as 3-D tensors, read back through their own checkpoint)."""
    from test_moe import tiny_moe
    moe = fam not in FAMILIES
    model = tiny_moe(fam, layers=2, vocab=VOCAB, kv_heads=4 if fam == "olmoe" else 2) if moe else \
        tiny_model(fam, layers=2, hidden=256, inter=256, vocab=VOCAB)
    src = save(model, tmp_path / "m")
    for qtype in ("q4_k_m", "q5_0"):
        info = export_gguf(src, tmp_path / f"{qtype}.gguf", qtype)
        assert info["bytes"] == gguf_bytes(src, qtype)
        tol = TOL[64 if moe else 256] * (1.5 if fam.startswith("gemma") else 1)  # + llama.cpp's f16 GELU table
        got = _check(model, src, info["path"], tol, reload=moe)
        print(f"{fam} {qtype}: {info['tensor_types']} |dlogprob| {got:.3f}")


def test_mix_follows_llamacpp_rules():
    """The per-tensor types of llama.cpp's mixes (src/llama-quant.cpp) on a 32-layer model with rows of 4096."""
    mix = lambda q, **kw: Mix(q, n_layers=32, n_gqa=kw.get("gqa", 4), tied=kw.get("tied", False),  # noqa: E731
                              imatrix=kw.get("imatrix", False))
    shape = (4096, 4096)
    more = [i for i in range(32) if tensor_type(f"blk.{i}.ffn_down.weight", shape, mix("q4_k_m")) == T.Q6_K]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]  # use_more_bits
    assert [tensor_type(f"blk.{i}.attn_v.weight", shape, mix("q5_k_m")) for i in (0, 4, 6)] == [T.Q6_K, T.Q5_K, T.Q6_K]
    assert [tensor_type(f"blk.{i}.attn_v.weight", shape, mix("q3_k_m")) for i in (0, 1, 2)] == [T.Q5_K, T.Q5_K, T.Q4_K]
    assert [tensor_type(f"blk.{i}.ffn_down.weight", shape, mix("q3_k_m")) for i in (0, 1, 2, 20)] == \
        [T.Q5_K, T.Q5_K, T.Q4_K, T.Q4_K]
    assert tensor_type("blk.5.attn_v.weight", shape, mix("q2_k")) == T.Q4_K
    assert tensor_type("blk.5.attn_v.weight", shape, mix("q2_k", gqa=1)) == T.Q3_K
    assert tensor_type("blk.5.attn_output.weight", shape, mix("q2_k")) == T.Q3_K
    assert tensor_type("blk.5.attn_q.weight", shape, mix("q2_k")) == T.Q2_K
    assert tensor_type("output.weight", (32000, 4096), mix("q4_0")) == T.Q6_K
    assert tensor_type("token_embd.weight", (32000, 4096), mix("q4_0")) == T.Q4_0
    assert tensor_type("token_embd.weight", (32000, 4096), mix("q4_0", tied=True)) == T.Q6_K
    assert tensor_type("token_embd.weight", (49152, 576), mix("q4_k_m", tied=True)) == T.Q8_0  # SmolLM2
    assert tensor_type("blk.0.ffn_down.weight", shape, mix("q4_0", imatrix=True)) == T.Q4_1
    assert tensor_type("blk.9.ffn_down.weight", shape, mix("q5_0", imatrix=True)) == T.Q5_0
    # rows no multiple of 256 fall back; no multiple of 32 either: f16
    assert [tensor_type("blk.9.attn_q.weight", (576, 576), mix(q)) for q in ("q2_k", "q4_k_m", "q5_k_m", "q6_k")] \
        == [T.Q4_0, T.Q5_0, T.Q5_1, T.Q8_0]
    assert tensor_type("blk.9.ffn_down.weight", (576, 40), mix("q4_k_m")) == T.F16
    assert tensor_type("blk.9.attn_norm.weight", (576,), mix("q4_k_m")) == T.F32
    assert tensor_type("blk.9.ffn_gate_inp.weight", (8, 576), mix("q4_k_m")) == T.F32
    moe8 = Mix("q4_k_m", n_layers=32, n_gqa=4, tied=False, n_expert=8)  # Mixtral's own rules
    assert [tensor_type(f"blk.4.{n}.weight", shape, moe8) for n in ("attn_v", "attn_k", "attn_output", "attn_q")] \
        == [T.Q8_0, T.Q8_0, T.Q5_K, T.Q4_K]


@needs_llamacpp
def test_quantizer_matches_gguf_reference():
    """llama.cpp's kernel without an importance matrix gives gguf-py's reference q4_0 bytes, and an importance
    matrix changes the result toward the important columns."""
    from comprune.export.gguf_quant import quantize
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g).numpy()
    assert (quantize(w, T.Q8_0) == gguf.quants.quantize(w, T.Q8_0)).all()
    imp = torch.ones(256)
    imp[:16] = 1000.0
    plain, weighted = (gguf.quants.dequantize(quantize(w, T.Q4_K, im), T.Q4_K).reshape(w.shape)
                       for im in (None, imp.numpy()))
    err = lambda d: float(((d - w)[:, :16] ** 2).mean())  # noqa: E731
    assert err(weighted) < err(plain)

