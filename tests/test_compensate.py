"""Least-squares compensation, structured OBS, query-head pruning, compensated layer removal, dense targets."""
import copy

import pytest
import torch

from transformers import AutoModelForCausalLM

from comprune import PruneConfig, prune, save_pretrained
from comprune.masktune import error_from_gram, output_gram, solve_scales
from comprune.models import get_adapter
from comprune.obs import obs_select
from comprune.refit import BlockStats, dense_cross, refit, residual
from comprune.surgery import attention_parts
from conftest import calib, tiny_model


def _problem(seed=0, m=400, f=24, d=10):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(m, f, generator=g, dtype=torch.float64) * torch.rand(f, generator=g, dtype=torch.float64)
    H[:, 1] = 0.9 * H[:, 2] + 0.1 * H[:, 1]
    W = torch.randn(d, f, generator=g, dtype=torch.float64)
    return H, W


def test_refit_beats_scales_beats_nothing():
    """For the same kept set: least squares <= per-neuron scales <= the unrefit cut (exact, no damping)."""
    H, W = _problem()
    G = H.T @ H
    keep = torch.ones(G.shape[0], dtype=torch.bool)
    keep[[0, 3, 5, 8, 13]] = False
    K = output_gram(G, W)
    e_cut = error_from_gram(K, keep)
    e_scales = error_from_gram(K, keep, solve_scales(K, keep, 0.0))
    C = dense_cross(G, W)
    energy = float((W @ G * W).sum())
    e_ls = residual(G, C, energy, keep, refit(G, C, keep, 0.0))
    assert e_ls <= e_scales <= e_cut
    assert e_ls < 0.999 * e_scales
    # the refit is the least-squares solution computed directly from the activations
    Y = H @ W.T
    sol = torch.linalg.lstsq(H[:, keep], Y).solution.T
    torch.testing.assert_close(refit(G, C, keep, 0.0), sol, rtol=1e-7, atol=1e-9)
    assert abs(e_ls - float(((Y - H[:, keep] @ sol.T) ** 2).sum())) < 1e-6 * e_ls


def test_obs_selection_is_greedy_least_squares():
    """One channel at a time, OBS removes the channel whose removal (after refitting the rest) costs least."""
    H, W = _problem(1, f=12)
    G = H.T @ H
    C = dense_cross(G, W)
    energy = float((W @ G * W).sum())
    keep = obs_select(G, C, 3, damp=0.0, chunk=1)
    ref = torch.ones(12, dtype=torch.bool)
    for _ in range(3):
        best = min((j for j in range(12) if ref[j]), key=lambda j: residual(
            G, C, energy, ref & (torch.arange(12) != j), refit(G, C, ref & (torch.arange(12) != j), 0.0)))
        ref[best] = False
    assert torch.equal(keep, ref)


def test_obs_groups_keep_buckets_balanced():
    H, W = _problem(2, f=24)
    G = H.T @ H
    groups = torch.arange(24).view(6, 4)          # 6 "heads" of 4 channels
    bucket = torch.arange(6) // 3                 # 2 "KV groups" of 3 heads
    keep = obs_select(G, dense_cross(G, W), 2, 0.01, groups=groups, per_bucket=bucket)
    heads = keep.view(6, 4)
    assert torch.equal(heads.all(1), heads.any(1))  # whole heads only
    assert heads.all(1).view(2, 3).sum(1).tolist() == [2, 2]


def _masked_from_pruned(dense, pruned, report):
    """The dense-shaped model with what the report cut masked and the pruned model's (refitted) weights in place:
    removed blocks skipped, cut down_proj / o_proj columns zero, kept ones equal to the pruned model's."""
    ref = copy.deepcopy(dense)
    adapter = get_adapter(ref)
    adapter.prepare(ref)  # fused families (Phi-3): their parts, as the pruner saw them
    adapter.prepare(pruned)
    plays = adapter.layers(pruned)
    hooks = []
    with torch.no_grad():
        for i, layer in enumerate(adapter.layers(ref)):
            if i in report.removed_layers:
                hooks.append(layer.register_forward_hook(
                    lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True))
                continue
            rec, p = report.blocks[i], plays[report.kept_layers.index(i)]
            down, pdown = adapter.mlp(layer).down, adapter.mlp(p).down
            w = torch.zeros_like(down.weight)
            w[:, rec["kept_neurons"]] = pdown.weight
            down.weight.copy_(w)
            parts, pp = attention_parts(adapter, layer), attention_parts(adapter, p)
            if "kept_query_heads" in rec:
                hd = parts.head_dim
                ch = torch.tensor([h * hd + c for h in rec["kept_query_heads"] for c in range(hd)])
                w = torch.zeros_like(parts.o.weight)
                w[:, ch] = pp.o.weight
                parts.o.weight.copy_(w)
    adapter.restore(pruned)
    return ref, hooks


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("cfg", [
    dict(recovery="least-squares", metric="obs"),
    dict(recovery="least-squares", metric="obs", head_share=0.3),
    dict(recovery="least-squares", metric="obs", target_mix=0.5, head_share=0.3, token_weight="output"),
    dict(recovery="least-squares", metric="activation", layer_compensation=True, layer_share=0.7),
    dict(recovery="least-squares", metric="obs", target_mix=1.0, layer_compensation=True, layer_share=0.7),
])
def test_pruned_equals_masked_dense_with_refits(family, cfg, tmp_path):
    """Query heads (the same number per KV group) and MLP neurons cut, the kept o_proj/down_proj columns refitted,
    blocks removed with their span folded into the previous down_proj: the physically smaller model computes what
    the masked dense one computes; no parameter is added; save -> reload gives the same logits."""
    dense = tiny_model(family, layers=6, heads=4, kv_heads=2)
    full = dict(ratio=0.3, layer_share=0.0, batch_size=4, **{k: v for k, v in cfg.items() if k != "layer_share"})
    full["layer_share"] = cfg.get("layer_share", 0.0)
    model, report = prune(copy.deepcopy(dense), None, PruneConfig(**full), calibration=calib(), progress=False)
    assert abs(report.ratio_achieved - 0.3) <= 0.01, report.ratio_achieved
    if cfg.get("head_share"):
        assert report.budget["query_heads_per_group"] == 1
        assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 2
    if cfg.get("layer_compensation"):
        assert report.removed_layers
        plain = dict(full, layer_compensation=False, target_mix=0.0)
        _, rep_plain = prune(copy.deepcopy(dense), None, PruneConfig(**plain), calibration=calib(), progress=False)
        assert rep_plain.params_after == report.params_after  # the fold adds nothing
    for rec in report.blocks.values():
        assert rec["rel_error_tuned"] <= rec["rel_error_pruned"] + 1e-9
        if "head_rel_error_tuned" in rec:
            assert rec["head_rel_error_tuned"] <= rec["head_rel_error_pruned"] + 1e-9
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(9))
    ref, hooks = _masked_from_pruned(dense, model, report)
    try:
        expect = _logits(ref, ids)
    finally:
        for h in hooks:
            h.remove()
    got = _logits(model, ids)
    assert torch.allclose(got, expect, atol=1e-4, rtol=0), (got - expect).abs().max()
    save_pretrained(model, None, tmp_path / "m", report)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert torch.equal(_logits(again, ids), got)


def test_refit_lowers_the_error_to_its_own_target():
    """Across every block, least squares leaves less calibration error than scales on the same kept neurons."""
    dense = tiny_model("llama", layers=4)
    base = dict(ratio=0.3, layer_share=0.0, batch_size=4, metric="activation")
    _, sc = prune(copy.deepcopy(dense), None, PruneConfig(**base, recovery="scales"), calibration=calib(),
                  progress=False)
    _, ls = prune(copy.deepcopy(dense), None, PruneConfig(**base, recovery="least-squares", damp=1e-6),
                  calibration=calib(), progress=False)
    # block 0 sees the same inputs in both runs: same kept set, and the refit is at least as good as the scales
    assert ls.blocks[0]["kept_neurons"] == sc.blocks[0]["kept_neurons"]
    assert ls.blocks[0]["rel_error_tuned"] <= sc.blocks[0]["rel_error_tuned"] + 1e-9
    assert sc.blocks[0]["rel_error_tuned"] <= sc.blocks[0]["rel_error_pruned"] + 1e-12


def test_dense_target_equals_local_target_on_the_first_block():
    """At block 0 the pruned and the dense trajectories coincide: mixing in the dense target changes nothing
    there, and changes later blocks (they see drift to correct)."""
    dense = tiny_model("llama", layers=4)
    base = dict(ratio=0.3, layer_share=0.0, batch_size=4, recovery="least-squares", metric="obs")
    m0, r0 = prune(copy.deepcopy(dense), None, PruneConfig(**base), calibration=calib(), progress=False)
    m1, r1 = prune(copy.deepcopy(dense), None, PruneConfig(**base, target_mix=1.0), calibration=calib(),
                   progress=False)
    a0, a1 = get_adapter(m0).layers(m0), get_adapter(m1).layers(m1)
    assert r0.blocks[0]["kept_neurons"] == r1.blocks[0]["kept_neurons"]
    torch.testing.assert_close(a0[0].mlp.down_proj.weight, a1[0].mlp.down_proj.weight, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a0[3].mlp.down_proj.weight, a1[3].mlp.down_proj.weight)


@pytest.mark.parametrize("extra", [dict(target_mix=0.5), dict(layer_compensation=True, layer_share=0.7)])
def test_bad_combinations_are_refused(extra):
    from comprune.errors import CompruneError
    with pytest.raises(CompruneError, match="least-squares"):
        PruneConfig(recovery="scales", **extra).validate()


@pytest.mark.parametrize("family", ["gemma3_text", "olmo2", "llama"])
def test_token_weights_follow_the_next_norm(family):
    """Each token's weight is 1 / mean square of what the next norm sees: the projection's own output where a
    norm follows it (Gemma, OLMo 2), the block's output (the residual stream) where none does (Llama)."""
    from comprune.walk import capture, forward_block
    model = tiny_model(family, layers=2)
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    down = adapter.mlp(layer).down
    acts = capture(model, adapter, calib(n=4, t=16).input_ids, 2, "cpu")
    own = BlockStats(down, "output", normed=adapter.output_norms)
    seen = []
    hooks = own.attach(layer) + [
        down.register_forward_hook(lambda mod, a, o: seen.append((a[0], o))),
        layer.register_forward_hook(lambda mod, a, o: seen.append(o[0] if isinstance(o, tuple) else o))]
    forward_block(layer, acts)
    for h in hooks:
        h.remove()
    expected = 0
    for (h, m), y in zip(seen[0::2], seen[1::2]):
        h, m, y = (t.reshape(-1, t.shape[-1]).double() for t in (h, m, y))
        z = m if family != "llama" else y
        expected = expected + (h / z.pow(2).mean(1, keepdim=True)).T @ h
    assert adapter.output_norms == (family != "llama")
    torch.testing.assert_close(own.G, expected, rtol=1e-3, atol=1e-5 * float(expected.abs().max()))
