"""Mixture-of-experts families (Qwen3-MoE, Mixtral, OLMoE) on tiny random models: COMP removes whole experts
(with their router rows) and then neurons inside the kept experts, refitted by least squares. The pruned model
computes what the dense model computes with those experts' router logits at -inf and those neurons masked; the
checkpoint is the family's own 3-D layout, which stock transformers reloads to identical logits."""
import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from comprune import PruneConfig, prune, save_pretrained
from comprune.errors import CompruneError
from comprune.methods.experts import expert_scores
from comprune.models import get_adapter
from comprune.walk import capture
from conftest import calib, greedy_matches_uncached, randomize

MOE_FAMILIES = ["qwen3_moe", "mixtral", "olmoe"]
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(9))


def tiny_moe(family: str, layers: int = 4, experts: int = 6, inter: int = 128, top_k: int = 2, seed: int = 0,
             vocab: int = 256, kv_heads: int = 2):
    kw = dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
              vocab_size=vocab, max_position_embeddings=512, num_experts_per_tok=top_k, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
    if family == "mixtral":
        kw.update(intermediate_size=inter, num_local_experts=experts)
    elif family == "olmoe":
        kw.update(intermediate_size=inter, num_experts=experts, norm_topk_prob=False)
    else:
        kw.update(moe_intermediate_size=inter, num_experts=experts, intermediate_size=2 * inter, norm_topk_prob=True)
    torch.manual_seed(seed)
    return randomize(AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw), dtype=torch.float32))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _route(router, h, removed=()):
    """Top-k routing as the families compute it, with `removed` experts' logits at -inf."""
    h = h.reshape(-1, router.weight.shape[1])
    logits = F.linear(h, router.weight)
    if removed:
        logits = logits.clone()
        logits[:, list(removed)] = float("-inf")
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top.to(logits.dtype), idx


def _masked_reference(dense, pruned, report):
    """The dense model (its experts as per-expert linears) with the removed experts masked at the router and
    each kept expert's down_proj reading only its kept neurons, with the pruned model's (refitted) weights."""
    adapter = get_adapter(dense)
    adapter.prepare(dense)
    adapter.prepare(pruned)
    p_layers = adapter.layers(pruned)
    hooks = []
    for i, layer in enumerate(adapter.layers(dense)):
        rec = report.blocks[i]
        router = adapter.router(layer)
        kept = rec.get("kept_experts", list(range(router.weight.shape[0])))
        removed = [e for e in range(router.weight.shape[0]) if e not in kept]
        hooks.append(router.register_forward_hook(lambda m, args, out, r=removed: _route(m, args[0], r)))
        p_experts = adapter.experts(p_layers[report.kept_layers.index(i)]).experts
        for j, e in enumerate(kept):
            keep = torch.tensor(rec["kept_neurons"][j]) if "kept_neurons" in rec else None
            down = adapter.experts(layer).experts[e].down_proj
            w = p_experts[j].down_proj.weight.detach()
            hooks.append(down.register_forward_hook(
                lambda m, args, out, k=keep, w=w: (args[0] if k is None else args[0][..., k]) @ w.T))
    return hooks


def _masked_logits(dense, pruned, report):
    """Logits of (copies of) the dense model under _masked_reference."""
    ref = copy.deepcopy(dense)
    hooks = _masked_reference(ref, copy.deepcopy(pruned), report)
    try:
        return _logits(ref)
    finally:
        for h in hooks:
            h.remove()


@pytest.fixture(params=MOE_FAMILIES)
def moe_family(request):
    return request.param


def test_reference_routing_is_the_familys(moe_family):
    """The masked reference's router reproduces the family's own routing when nothing is masked."""
    model = tiny_moe(moe_family, layers=1)
    router = get_adapter(model).router(model.model.layers[0])
    h = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    for a, b in zip(router(h), _route(router, h)):
        assert torch.equal(a, b)


def test_split_experts_compute_the_stock_forward(moe_family):
    dense = tiny_moe(moe_family)
    model = copy.deepcopy(dense)
    adapter = get_adapter(model)
    adapter.prepare(model)
    assert torch.allclose(_logits(model), _logits(dense), atol=1e-5, rtol=0)
    adapter.restore(model)
    assert torch.equal(_logits(model), _logits(dense))
    assert model.state_dict().keys() == dense.state_dict().keys()


def test_comp_removes_experts_and_neurons_equal_to_masked_dense_and_reloads(moe_family, tmp_path):
    dense = tiny_moe(moe_family)
    cfg = PruneConfig(ratio=0.3, ratio_of="blocks", batch_size=4)
    model, report = prune(copy.deepcopy(dense), None, cfg, calibration=calib(8, 24), progress=False)
    b = report.budget
    half_step = b["quantum_params"] / 2 / (b["params_to_remove"] / 0.3)  # 8 neurons of every kept expert
    assert abs(report.ratio_achieved - 0.3) <= half_step
    assert b["experts_per_layer"] == 1 and b["neurons_per_layer"] > 0
    key = "num_local_experts" if moe_family == "mixtral" else "num_experts"
    assert getattr(model.config, key) == 5
    width = 128 - report.budget["neurons_per_layer"]
    assert report.mlp_widths == [width] * 4 and width % 8 == 0  # 16-byte strides for transformers' grouped kernel
    for layer in model.model.layers:
        assert tuple(layer.mlp.experts.gate_up_proj.shape) == (5, 2 * width, 64)
        assert tuple(layer.mlp.experts.down_proj.shape) == (5, 64, width)
        assert tuple(layer.mlp.gate.weight.shape) == (5, 64)
    for rec in report.blocks.values():
        assert len(rec["kept_experts"]) == 5 and all(len(k) == width for k in rec["kept_neurons"])
        assert rec["rel_error_tuned"] <= rec["rel_error_pruned"]  # the refit never loses to plain removal
    got = _logits(model)
    expect = _masked_logits(dense, model, report)
    assert torch.allclose(got, expect, atol=1e-4, rtol=0), (got - expect).abs().max()
    save_pretrained(model, None, tmp_path / "m", report)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert type(again) is type(dense)  # the family's own class and config: stock transformers reads it
    assert torch.equal(_logits(again), got)
    model.generation_config.eos_token_id = None
    assert greedy_matches_uncached(model, IDS[:1, :6])


def test_an_expert_that_contributes_nothing_goes_first():
    dense = tiny_moe("qwen3_moe", layers=2)
    adapter = get_adapter(dense)
    with torch.no_grad():
        dense.model.layers[0].mlp.experts.down_proj[3].zero_()
    adapter.prepare(dense)
    acts = capture(dense, adapter, calib(8, 24).input_ids, 4, torch.device("cpu"))
    score, tokens = expert_scores(dense.model.layers[0], adapter, acts)
    assert score[3] == 0 and tokens[3] > 0 and (score[torch.arange(6) != 3] > 0).all()
    adapter.restore(dense)
    _, report = prune(dense, None, PruneConfig(ratio=0.3, ratio_of="blocks", batch_size=4), calibration=calib(8, 24),
                      progress=False)
    assert 3 not in report.blocks[0]["kept_experts"]


@pytest.mark.parametrize("cfg, needle", [
    (dict(method="llm-pruner"), "mixture-of-experts"),
    (dict(width_allocation="search"), "not implemented for mixture-of-experts"),
    (dict(expert_share=1.0, ratio=0.8), "experts per block"),
])
def test_moe_refusals_name_the_problem(cfg, needle):
    with pytest.raises(CompruneError, match=needle):
        prune(tiny_moe("mixtral", layers=3), None, PruneConfig(**{"ratio": 0.3, "batch_size": 4, **cfg}),
              calibration=calib(8, 24), progress=False)


@pytest.mark.parametrize("method", ["wanda-sp", "magnitude", "flap"])
def test_neuron_baselines_prune_inside_every_expert_equal_to_masked_dense(method, tmp_path):
    """The neuron baselines keep every expert and remove as many neurons from each (no whole experts)."""
    dense = tiny_moe("qwen3_moe", layers=3)
    model, report = prune(copy.deepcopy(dense), None, PruneConfig(ratio=0.2, ratio_of="blocks", method=method,
                                                                  batch_size=4), calibration=calib(8, 24), progress=False)
    assert report.budget["experts_per_layer"] == 0 and model.config.num_experts == 6
    width = 128 - report.budget["neurons_per_layer"]
    assert report.mlp_widths == [width] * 3 and width < 128
    got = _logits(model)
    expect = _masked_logits(dense, model, report)
    assert torch.allclose(got, expect, atol=1e-4, rtol=0), (got - expect).abs().max()
    save_pretrained(model, None, tmp_path / "m", report)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()), got)


def test_layer_drop_prunes_moe_blocks(tmp_path):
    dense = tiny_moe("olmoe", layers=5)
    model, report = prune(copy.deepcopy(dense), None, PruneConfig(ratio=0.2, method="layer-drop", batch_size=4),
                          calibration=calib(8, 24), progress=False)
    assert len(report.removed_layers) >= 1 and model.config.num_hidden_layers == 5 - len(report.removed_layers)
    save_pretrained(model, None, tmp_path / "m", report)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert torch.equal(_logits(again), _logits(model))


@pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None, reason="xllamacpp not installed")
@pytest.mark.parametrize("fam, arch", [("qwen3_moe", "qwen3moe"), ("mixtral", "llama"), ("olmoe", "olmoe")])
def test_gguf_of_pruned_moe_matches_transformers(fam, arch, tmp_path):
    """Experts and neurons removed, exported as f32: llama.cpp's MoE archs give transformers' next-token
    log-probabilities (the router, the stacked experts, the expert count and width in the header)."""
    from comprune.export.gguf import export_gguf
    from test_gguf import VOCAB, max_logprob_diff, prompts, save
    dense = tiny_moe(fam, layers=3, vocab=VOCAB, kv_heads=4 if fam == "olmoe" else 2)  # llama.cpp's olmoe: no GQA
    model, report = prune(dense, None, PruneConfig(ratio=0.3, ratio_of="blocks", batch_size=4),
                          calibration=calib(8, 24, vocab=VOCAB), progress=False)
    assert report.budget["experts_per_layer"] == 1
    src = save(model, tmp_path / "m")
    info = export_gguf(src, tmp_path / "m.gguf", "f32")
    assert info["arch"] == arch
    diff = max_logprob_diff(model, src, info["path"], prompts(), exact=True)
    assert diff < 1e-4, diff


@pytest.mark.parametrize("fam", ["qwen3_moe", "mixtral"])
def test_moe_streams_from_its_per_expert_checkpoint_equal_to_in_memory(fam, tmp_path):
    """--stream reads the checkpoint's one-tensor-per-expert layout block by block and writes it back the same
    way: the streamed output equals the in-memory prune's, tensor for tensor, and reloads in stock transformers."""
    from comprune import prune_streaming
    from safetensors import safe_open
    src = tmp_path / "src"
    tiny_moe(fam, layers=3).save_pretrained(src)
    cfg = dict(ratio=0.3, ratio_of="blocks", batch_size=4, head_share=0.05)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model, report = prune(model, None, PruneConfig(**cfg), calibration=calib(8, 24), progress=False, base_model="m")
    save_pretrained(model, None, tmp_path / "mem", report)
    rep = prune_streaming(src, tmp_path / "stream", PruneConfig(**cfg), calibration=calib(8, 24), progress=False,
                          base_model="m")
    assert rep.params_after == report.params_after and report.budget["experts_per_layer"] > 0

    def weights(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out
    a, b = weights(tmp_path / "stream"), weights(tmp_path / "mem")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "stream", dtype=torch.float32).eval()
    assert torch.equal(_logits(again), _logits(model))
