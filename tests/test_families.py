"""Every family beyond the Llama layout (conftest.OTHER_FAMILIES: Gemma 2/3, Qwen3, Phi-3, OPT, OLMo 2, Granite,
SmolLM3) on tiny random models: the pruned model computes what the masked dense one computes after COMP and
after each forward-only baseline, save -> reload gives identical logits, cached generation equals uncached
argmax steps, and the GGUF export runs in llama.cpp with transformers' next-token distribution. A family that
reuses a known layout is one registered record."""
import copy
import dataclasses
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from comprune import PruneConfig, prune, save_pretrained
from comprune.errors import CompruneError
from comprune.models.saved import per_layer_config
from comprune.models import get_adapter
from conftest import OTHER_FAMILIES, calib, greedy_matches_uncached, masked_dense_logits, tiny_model
from test_compensate import _masked_from_pruned

HEADLESS = {"olmo2", "opt"}  # families whose heads cannot be pruned (adapter.head_pruning_refusal)
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(9))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _generates(model):
    model.generation_config.eos_token_id = None  # a random tiny model may emit its EOS id and stop early
    return greedy_matches_uncached(model, IDS[:1, :6])


def _reloaded(model, report, path, stock: bool):
    """Stock: the family's own transformers class reads it. Otherwise comprune's per-layer class, registered with
    the Auto factories by `import comprune` (what comprune.load uses), with no remote code."""
    save_pretrained(model, None, path, report)
    cfg = (path / "config.json").read_text()
    assert ('"intermediate_sizes"' in cfg) != stock
    # per-layer outputs name the base model_type (stock tokenizers need no remote code): their config class
    # comes from comprune (models/saved.py), as comprune.load does
    return AutoModelForCausalLM.from_pretrained(path, config=per_layer_config(path), dtype=torch.float32).eval()


@pytest.fixture(params=OTHER_FAMILIES)
def other_family(request):
    return request.param


def test_comp_equals_masked_dense_and_reloads(other_family, tmp_path):
    """COMP with a removed block, least-squares MLP refits and (where the family allows) query heads, on a
    4-head / 1-KV-head attention like Gemma 3 270M's: 3 heads of head_dim 16 no longer divide hidden 64 in
    Llama's and Gemma's configs, so those need comprune's config (explicit head_dim) even with uniform widths."""
    fam = other_family
    dense = tiny_model(fam, layers=5, heads=4, kv_heads=1)
    heads = fam not in HEADLESS
    cfg = PruneConfig(ratio=0.4, ratio_of="blocks", layer_share=0.6, head_share=0.2 if heads else 0.0, batch_size=4)
    model, report = prune(copy.deepcopy(dense), None, cfg, calibration=calib(8, 24), progress=False)
    assert report.removed_layers and abs(report.ratio_achieved - 0.4) <= 0.005
    if heads:
        assert report.budget["query_heads_per_group"] == 1
        assert all(len(b["kept_query_heads"]) == 3 for b in report.blocks.values())
    ref, hooks = _masked_from_pruned(dense, model, report)
    try:
        expect = _logits(ref)
    finally:
        for h in hooks:
            h.remove()
    got = _logits(model)
    assert torch.allclose(got, expect, atol=1e-4, rtol=0), (got - expect).abs().max()
    for key in ("layer_types", "no_rope_layers"):  # per-layer config lists follow the kept blocks
        if getattr(dense.config, key, None) is not None:
            assert getattr(model.config, key) == [getattr(dense.config, key)[i] for i in report.kept_layers]
    stock = model.config.model_type == fam
    assert stock == (not heads or fam not in ("gemma3_text", "gemma2")), model.config.model_type
    again = _reloaded(model, report, tmp_path / "m", stock)
    assert torch.equal(_logits(again), got)
    assert _generates(model)


@pytest.mark.parametrize("method", ["wanda-sp", "flap", "layer-drop"])
def test_baselines_equal_masked_dense(other_family, method, tmp_path):
    fam = other_family
    # head_dim 4: FLAP ranks whole KV groups against single neurons, so groups must be small for its prefix to
    # land within 0.5 % of the ratio
    dense = tiny_model(fam, layers=4, heads=8, kv_heads=4, head_dim=4)
    cfg = PruneConfig(ratio=0.25, method=method, batch_size=4)
    model, report = prune(copy.deepcopy(dense), None, cfg, calibration=calib(8, 24), progress=False)
    got = _logits(model)
    expect = masked_dense_logits(dense, report, IDS, pruned=model)
    assert torch.allclose(got, expect, atol=1e-4, rtol=0), (got - expect).abs().max()
    if method == "flap":  # per-layer widths (and heads): comprune's per-layer class, through comprune.load
        assert model.config.model_type == f"comprune_{fam}"
        if fam in HEADLESS:
            assert all(b["kept_kv_heads"] == list(range(b["kv_heads"])) for b in report.blocks.values())
            assert "heads_kept" in report.details
        assert torch.equal(_logits(_reloaded(model, report, tmp_path / "m", stock=False)), got)
    assert _generates(model)


@pytest.mark.slow
@pytest.mark.parametrize("fam", ["gemma3_text", "qwen3", "phi3", "opt"])
def test_llm_pruner_equals_masked_dense(fam):
    dense = tiny_model(fam, layers=4, heads=4, kv_heads=2)
    model, report = prune(copy.deepcopy(dense), None, PruneConfig(ratio=0.25, method="llm-pruner", batch_size=4),
                          calibration=calib(8, 24), progress=False)
    assert torch.allclose(_logits(model), masked_dense_logits(dense, report, IDS, pruned=model), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fam", sorted(HEADLESS))
def test_head_pruning_is_refused_where_it_cannot_be_exact(fam):
    with pytest.raises(CompruneError, match="MLP neurons only"):
        prune(tiny_model(fam, layers=3), None, PruneConfig(ratio=0.2, head_share=0.3, batch_size=4),
              calibration=calib(4, 16), progress=False)


def test_phi3_longrope_refuses_heads_and_split_is_exact():
    from transformers import AutoConfig
    adapter = get_adapter(tiny_model("phi3", layers=1))
    cfg = AutoConfig.for_model("phi3", rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                                        "short_factor": [1.0] * 48, "long_factor": [1.0] * 48})
    assert "longrope" in adapter.head_pruning_refusal(cfg)
    model = tiny_model("phi3", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _logits(model)
    adapter.prepare(model)
    assert torch.allclose(_logits(model), ref, atol=1e-6, rtol=0)
    adapter.restore(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_ratio_of_blocks_budgets_without_embeddings():
    """A tiny vocabulary-heavy model (embeddings ~ 2/3 of it, like Gemma 3 270M): 40 % of all parameters
    cannot come from the blocks, and the error says how to ask for 40 % of the blocks instead."""
    dense = tiny_model("gemma3_text", layers=3, vocab=2048)
    with pytest.raises(CompruneError, match="--ratio-of blocks"):
        prune(copy.deepcopy(dense), None, PruneConfig(ratio=0.4, batch_size=4), calibration=calib(4, 16),
              progress=False)
    _, report = prune(copy.deepcopy(dense), None, PruneConfig(ratio=0.4, ratio_of="blocks", layer_share=0.0,
                                                              batch_size=4), calibration=calib(4, 16), progress=False)
    blocks = sum(p.numel() for p in dense.model.layers.parameters())
    assert report.ratio_of == "blocks"
    assert report.ratio_achieved == pytest.approx((report.params_before - report.params_after) / blocks)
    assert abs(report.ratio_achieved - 0.4) <= 0.005


# ------------------------------------------------------------------------------------------------- GGUF
needs_llamacpp = pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None,
                                    reason="xllamacpp (llama.cpp runtime) not installed: pip install xllamacpp")
# f32 export, f32 KV cache: ~1e-6 except Gemma, whose GELU llama.cpp tabulates in f16 (measured 4e-3..6e-3 on
# these models; 5e-6 with the MLPs zeroed, so attention, norms, soft-capping and the sliding pattern are exact)
GGUF_TOL = {"gemma3_text": 2e-2, "gemma2": 2e-2}
GGUF_ARCH = {"gemma3_text": "gemma3", "gemma2": "gemma2", "qwen3": "qwen3", "phi3": "phi3", "olmo2": "olmo2",
             "granite": "granite", "smollm3": "smollm3"}


@pytest.mark.slow
@needs_llamacpp
@pytest.mark.parametrize("fam", sorted(GGUF_ARCH))
def test_gguf_of_pruned_model_matches_transformers(fam, tmp_path):
    """COMP-pruned (uniform widths, a removed block except where llama.cpp fixes the layer pattern) and exported
    as f32: llama.cpp gives transformers' next-token log-probabilities."""
    from comprune.export.gguf import export_gguf
    from test_gguf import VOCAB, max_logprob_diff, prompts, save
    dense = tiny_model(fam, layers=4, vocab=VOCAB)
    fixed_pattern = fam in ("smollm3", "gemma2")  # llama.cpp: NoPE every 4th layer / strict alternation
    cfg = PruneConfig(ratio=0.3, ratio_of="blocks", layer_share=0.0 if fixed_pattern else 0.9, batch_size=4)
    model, report = prune(dense, None, cfg, calibration=calib(8, 24, vocab=VOCAB), progress=False)
    assert fixed_pattern or report.removed_layers
    src = save(model, tmp_path / "m")
    info = export_gguf(src, tmp_path / "m.gguf", "f32")
    assert info["arch"] == GGUF_ARCH[fam]
    diff = max_logprob_diff(model, src, info["path"], prompts(), exact=True)
    print(f"{fam} pruned f32: max |dlogprob| = {diff:.2e}")
    assert diff < GGUF_TOL.get(fam, 1e-4)


def test_gguf_refusals_name_the_reason(tmp_path):
    """OPT has no llama.cpp arch; per-layer widths exist only in `deci` (Llama layout); SmolLM3's NoPE layers
    out of llama.cpp's fixed every-4th pattern."""
    from comprune.export.gguf import export_gguf
    from test_gguf import save
    opt = save(tiny_model("opt", layers=2), tmp_path / "opt")
    with pytest.raises(CompruneError, match="no OPT architecture"):
        export_gguf(opt, tmp_path / "opt.gguf")
    model, _ = prune(tiny_model("qwen3", layers=3), None, PruneConfig(ratio=0.25, method="flap", batch_size=4),
                     calibration=calib(4, 16), progress=False)
    with pytest.raises(CompruneError, match="only in its `deci` arch"):
        export_gguf(save(model, tmp_path / "q"), tmp_path / "q.gguf")
    smol = tiny_model("smollm3", layers=4)
    smol.config.no_rope_layers = [1, 1, 0, 1]
    with pytest.raises(CompruneError, match="every 4th layer"):
        export_gguf(save(smol, tmp_path / "s"), tmp_path / "s.gguf")
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("fam", ["gemma3_text", "opt"])
def test_stream_equals_in_memory(fam, tmp_path):
    """Families without comprune's lite modules stream through transformers' classes: same tensors, config and
    logits as the in-memory prune. Phi-3's fused matrices are refused with the reason."""
    from comprune import load, prune_streaming
    from test_stream import _sharded, _weights
    from test_stream import calib as stream_calib
    src = _sharded(tmp_path / "src", tiny_model(fam, layers=4))
    cfg = dict(ratio=0.3, ratio_of="blocks", layer_share=0.5, batch_size=4)
    model, tok = load(src)
    model, report = prune(model, tok, PruneConfig(**cfg), calibration=stream_calib(), progress=False)
    save_pretrained(model, tok, tmp_path / "mem", report)
    rep = prune_streaming(src, tmp_path / "stream", PruneConfig(**cfg), calibration=stream_calib(), progress=False)
    assert rep.removed_layers == report.removed_layers and rep.params_after == report.params_after
    a, b = _weights(tmp_path / "stream"), _weights(tmp_path / "mem")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(load(tmp_path / "stream")[0], IDS % 96), _logits(model, IDS % 96))


def test_phi3_refuses_to_stream(tmp_path):
    from comprune import prune_streaming
    from test_stream import _sharded
    from test_stream import calib as stream_calib
    src = _sharded(tmp_path / "src", tiny_model("phi3", layers=2))
    with pytest.raises(CompruneError, match="fused"):
        prune_streaming(src, tmp_path / "out", PruneConfig(ratio=0.2, batch_size=4), calibration=stream_calib(),
                        progress=False)


@pytest.mark.parametrize("fam", ["granite", "gemma3_text"])
def test_perplexity_uses_the_familys_logits(fam):
    """comprune.perplexity computes the head itself: Granite's logits_scaling and Gemma's soft-capping included."""
    import math

    from comprune import perplexity
    from comprune.evaluate.perplexity import bos_of, token_windows
    model = tiny_model(fam, layers=2)
    w = token_windows(IDS.flatten(), 20, bos=bos_of(model))  # Gemma's windows start with <bos>
    assert (bos_of(model) is not None) == (fam == "gemma3_text")
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(w).logits[:, :-1].reshape(-1, 256), w[:, 1:].reshape(-1))
    got = perplexity(model, None, ids=IDS.flatten(), seqlen=20, progress=False)["ppl"]
    assert got == pytest.approx(math.exp(ref.item()), rel=1e-5)


def test_gemma_calibration_windows_begin_with_bos():
    """Block-0 inputs of a Gemma model see <bos> first whatever the window's first token was (it is trained
    that way); a Llama model sees its tokens as they are."""
    from comprune.models.adapters import get_adapter
    from comprune.walk import capture
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    with_bos = ids.clone()
    for family, same in (("gemma3_text", True), ("llama", False)):
        model = tiny_model(family)
        with_bos[:, 0] = model.config.bos_token_id
        a = capture(model, get_adapter(model), ids, 2, "cpu").hidden[0]
        b = capture(model, get_adapter(model), with_bos, 2, "cpu").hidden[0]
        assert torch.equal(a, b) == same


class TwinConfig(LlamaConfig):
    """Llama under another model_type: a family comprune knows only from its record."""
    model_type = "llama_twin"


class TwinForCausalLM(LlamaForCausalLM):
    config_class = TwinConfig


@pytest.fixture
def twin_family():
    """Registered for one test, then removed from comprune and from transformers' Auto factories."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from comprune.models import FAMILIES, register_family, unregister_family
    AutoConfig.register(TwinConfig.model_type, TwinConfig)
    AutoModelForCausalLM.register(TwinConfig, TwinForCausalLM)
    classes = (f"{__name__}.{TwinConfig.__name__}", f"{__name__}.{TwinForCausalLM.__name__}")
    family = register_family(dataclasses.replace(FAMILIES["llama"], model_type=TwinConfig.model_type,
                                                 transformers=classes))
    try:
        yield family
    finally:
        unregister_family(family.model_type)
        CONFIG_MAPPING._extra_content.pop(TwinConfig.model_type, None)
        MODEL_FOR_CAUSAL_LM_MAPPING._extra_content.pop(TwinConfig, None)


@pytest.mark.parametrize("method", ["comp", "flap"])
def test_family_added_by_record_alone(twin_family, method, tmp_path):
    """One register_family call: the family prunes (COMP: uniform widths, the family's own classes; FLAP:
    per-layer widths, comprune's classes derived from them), saves, reloads with the same logits and exports to
    GGUF."""
    import gguf

    from comprune import from_pretrained
    from comprune.export.gguf import export_gguf
    from comprune.models import CONFIGS
    from test_gguf import VOCAB, save_tokenizer
    dense = tiny_model(twin_family.model_type, layers=3, vocab=VOCAB)
    assert type(dense) is TwinForCausalLM and get_adapter(dense).family == twin_family.model_type
    cfg = PruneConfig(ratio=0.25, method=method, batch_size=4)
    model, report = prune(dense, None, cfg, calibration=calib(8, 24, vocab=VOCAB), progress=False)
    per_layer = method == "flap"
    assert isinstance(model.config, CONFIGS[twin_family.model_type]) == per_layer
    save_pretrained(model, None, tmp_path / "m", report)
    save_tokenizer(tmp_path / "m")
    reloaded, _ = from_pretrained(str(tmp_path / "m"))
    assert torch.equal(_logits(model), _logits(reloaded))
    info = export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    assert info["arch"] == ("deci" if per_layer else "llama")
    names = {t.name for t in gguf.GGUFReader(info["path"]).tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight"} <= names
