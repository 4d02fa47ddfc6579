"""Baselines (layer-drop, wanda-sp, magnitude, flap, llm-pruner): scores against their formulas, the Taylor
gradients against finite differences, exact surgery, ratio accounting, FLAP biases through save/load, and the
comparison harness on a tiny model."""
import copy
import json
import subprocess
import sys

import pytest
import torch

from comprune import PruneConfig, prune, save_pretrained
from comprune import scores as S
from comprune.methods.flap import flap_select
from comprune.methods.llm_pruner import loss_gradients, middle_blocks
from comprune.methods.common import choose_layers
from comprune.models import get_adapter
from comprune.models.saved import per_layer_config
from comprune.surgery import attention_parts, kv_group_channels
from conftest import calib, greedy_matches_uncached, masked_dense_logits, tiny_model

BASELINES = ["layer-drop", "wanda-sp", "magnitude", "flap", "llm-pruner"]


def _cfg(method, ratio=0.3, **kw):
    taylor = {"taylor_nsamples": 8, "taylor_seqlen": 32} if method == "llm-pruner" else {}
    return PruneConfig(method=method, ratio=ratio, batch_size=8, **taylor, **kw)


# ------------------------------------------------------------------------------------------ scores = formulas
def test_registered_with_their_capabilities():
    from comprune import registry
    assert set(BASELINES) | {"comp"} <= set(registry.names())
    assert registry.get("llm-pruner").needs_gradients
    assert not any(registry.get(m).needs_gradients for m in registry.names() if m != "llm-pruner")


def test_wanda_magnitude_fluctuation_scores_equal_their_formulas():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, generator=g, dtype=torch.float64)
    W = torch.randn(4, 6, generator=g, dtype=torch.float64)       # [out, in]: neurons are input columns
    sq = (X ** 2).sum(0)
    var = X.var(0, unbiased=False)
    ws = S.wanda_sp_scores(W, sq)
    fl = S.fluctuation_scores(W, var)
    for j in range(6):
        assert ws[j].item() == pytest.approx(sum(abs(W[i, j].item()) for i in range(4)) / 4 * X[:, j].norm().item())
        assert fl[j].item() == pytest.approx(X[:, j].var(unbiased=False).item() * (W[:, j] ** 2).sum().item())
    gate, up = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    down = torch.randn(3, 6, generator=g)
    mag = S.magnitude_scores(gate, up, down.T)
    for j in range(6):
        expect = torch.cat([gate[j], up[j], down[:, j]]).double().norm()
        assert mag[j].item() == pytest.approx(expect.item())


def test_flap_scores_standardised_per_module_and_grouped_per_kv_head():
    g = torch.Generator().manual_seed(1)
    W_o = torch.randn(8, 12, generator=g, dtype=torch.float64)    # 12 o_proj inputs = 2 KV groups x 6 channels
    var = torch.rand(12, generator=g, dtype=torch.float64)
    raw = var * (W_o ** 2).sum(0)
    z = (raw ** 2 - (raw ** 2).mean()) / (raw ** 2).std()
    heads = S.flap_head_scores(W_o, var, n_kv=2)
    assert torch.allclose(heads, torch.stack([z[:6].mean(), z[6:].mean()]))
    ch = S.flap_channel_scores(W_o, var)
    assert ch.mean().abs() < 1e-12 and ch.std().item() == pytest.approx(1.0)
    assert torch.allclose(ch, (raw - raw.mean()) / raw.std())


def test_flap_compensation_bias_restores_the_mean_output():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(200, 10, generator=g, dtype=torch.float64) + torch.arange(10, dtype=torch.float64)
    W = torch.randn(5, 10, generator=g, dtype=torch.float64)
    removed = torch.tensor([1, 4, 7])
    kept = torch.tensor([i for i in range(10) if i not in (1, 4, 7)])
    b = S.compensation_bias(W, X.mean(0), removed)
    dense_mean = (X @ W.T).mean(0)
    pruned_mean = (X[:, kept] @ W[:, kept].T).mean(0) + b
    assert torch.allclose(dense_mean, pruned_mean, atol=1e-10)


def test_flap_global_selection_hits_the_target_and_keeps_every_module():
    units = [(float(s), 10, 0, "mlp", j) for j, s in enumerate([5, 1, 2, 3])]
    units += [(0.0, 25, 0, "attn", 0), (-1.0, 25, 0, "attn", 1)]
    chosen = flap_select(units, 50, {(0, "mlp"): 4, (0, "attn"): 2})
    # lowest first: attn 1 (-1.0), then attn 0 is skipped (module would be empty), mlp 1 (1), mlp 2 (2), mlp 3 (3)
    assert chosen == {(0, "attn", 1), (0, "mlp", 1), (0, "mlp", 2), (0, "mlp", 3)} or \
        chosen == {(0, "attn", 1), (0, "mlp", 1), (0, "mlp", 2)}
    total = sum(u[1] for u in units if (u[2], u[3], u[4]) in chosen)
    assert abs(total - 50) <= 5


def _float64_tiny():
    model = tiny_model("llama", layers=2, hidden=32, inter=48, heads=4, kv_heads=2, vocab=64).double()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def test_taylor_gradients_match_autograd_and_finite_differences():
    model = _float64_tiny()
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(3))

    def loss():  # the next-token loss written independently of transformers' loss function
        logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))

    model.zero_grad()
    loss().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss_gradients(model, ids, batch_size=2)  # two uneven batches: still the mean loss gradient (HF upcasts logits
    # to float32, hence the float32-level tolerance)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], rtol=1e-4, atol=1e-7), (n, (p.grad - ref[n]).abs().max())
    # finite differences (transformers' RMSNorm computes in float32, so the tolerance is loose)
    layer = model.model.layers[1]
    eps = 1e-3
    for lin, (r, c) in ((layer.self_attn.q_proj, (3, 5)), (layer.self_attn.o_proj, (7, 2)),
                        (layer.mlp.gate_proj, (11, 0)), (layer.mlp.down_proj, (4, 30))):
        w = lin.weight
        with torch.no_grad():
            w[r, c] += eps
            up = loss().item()
            w[r, c] -= 2 * eps
            dn = loss().item()
            w[r, c] += eps
        fd = (up - dn) / (2 * eps)
        assert w.grad[r, c].item() == pytest.approx(fd, rel=5e-2, abs=2e-5), lin


def test_taylor_group_scores_equal_sums_over_coupled_weights():
    model = _float64_tiny()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(4))
    loss_gradients(model, ids, batch_size=4)
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    a = attention_parts(adapter, layer)
    m = adapter.mlp(layer)
    pair = lambda lin: (lin.weight.detach(), lin.weight.grad)  # noqa: E731
    imp = lambda lin: (lin.weight.detach() * lin.weight.grad).abs()  # noqa: E731
    groups = S.taylor_kv_groups(pair(a.q), pair(a.k), pair(a.v), pair(a.o), a.head_dim, a.rep)
    for g in range(a.n_kv):
        qo, kv = kv_group_channels(a, torch.tensor([g]))
        expect = imp(a.q)[qo].sum() + imp(a.k)[kv].sum() + imp(a.v)[kv].sum() + imp(a.o)[:, qo].sum()
        assert groups[g].item() == pytest.approx(expect.item(), rel=1e-12)
    chans = S.taylor_mlp_channels(pair(m.gate), pair(m.up), pair(m.down))
    for j in (0, 17, 47):
        expect = imp(m.gate)[j].sum() + imp(m.up)[j].sum() + imp(m.down)[:, j].sum()
        assert chans[j].item() == pytest.approx(expect.item(), rel=1e-12)


# -------------------------------------------------------------------------------- exact surgery, every method
@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pruned_equals_masked_dense(method, family):
    dense = tiny_model(family, layers=6, heads=8, kv_heads=4)
    model, report = prune(copy.deepcopy(dense), None, _cfg(method), calibration=calib(), progress=False)
    assert len(report.kept_layers) == model.config.num_hidden_layers
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got = model(ids).logits
    expect = masked_dense_logits(dense, report, ids, pruned=model)
    assert torch.allclose(got, expect, atol=1e-4, rtol=0), (got - expect).abs().max()
    assert greedy_matches_uncached(model, ids[:1, :6])
    if method == "layer-drop":
        assert report.removed_layers and all(b["width"] == 128 for b in report.blocks.values())
    if method in ("flap", "llm-pruner"):
        assert any(len(b["kept_kv_heads"]) < b["kv_heads"] or b["heads"] < 8 for b in report.blocks.values()) or \
            method == "flap"
    if method == "flap" and family == "llama":
        assert report.details["bias_compensation"] and model.config.attention_bias and model.config.mlp_bias
        assert any(layer.mlp.down_proj.bias.abs().max() > 0 for layer in model.model.layers)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3])
@pytest.mark.parametrize("method", ["wanda-sp", "magnitude", "flap", "llm-pruner"])
def test_achieved_ratio_matches_request(method, ratio):
    model = tiny_model("llama", layers=8, inter=256, heads=8, kv_heads=4)
    _, report = prune(model, None, _cfg(method, ratio), calibration=calib(8, 32), progress=False)
    assert abs(report.ratio_achieved - ratio) <= 0.005, report.ratio_achieved
    assert report.params_after == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3])
def test_layer_drop_removes_the_lowest_bi_blocks_and_reports_its_granularity(ratio):
    model = tiny_model("llama", layers=8)
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    _, report = prune(model, None, _cfg("layer-drop", ratio), calibration=calib(8, 32), progress=False)
    k = max(1, round(ratio * total / block))
    assert len(report.removed_layers) == k == report.budget["layers_to_remove"]
    assert report.removed_layers == choose_layers(report.layer_scores, k, 1, 1)
    assert report.ratio_achieved == pytest.approx(k * block / total)


def test_llm_pruner_prunes_only_the_middle_blocks_with_gradients_on():
    dense = tiny_model("llama", layers=8, heads=8, kv_heads=4)
    model, report = prune(dense, None, _cfg("llm-pruner", 0.3), calibration=calib(), progress=False)
    start, end = middle_blocks(8, PruneConfig(method="llm-pruner"))
    for i, b in report.blocks.items():
        inside = start <= i < end
        assert (b["width"] < 128) == inside
    assert report.details["taylor"]["nsamples"] == 8 and report.details["taylor"]["seqlen"] == 32
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_neuron_only_baselines_budget_has_no_layers():
    _, report = prune(tiny_model("llama", layers=6), None, _cfg("wanda-sp", 0.2), calibration=calib(),
                      progress=False)
    assert report.budget["layers_to_remove"] == 0 and report.removed_layers == []


# ---------------------------------------------------------------------------- save / load of the new configs
def test_flap_biases_and_per_layer_heads_survive_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM
    dense = tiny_model("llama", layers=6, heads=8, kv_heads=4)
    model, report = prune(copy.deepcopy(dense), None, _cfg("flap", 0.3), calibration=calib(), progress=False)
    out = save_pretrained(model, None, tmp_path / "flap", report)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attention_bias"] and cfg["mlp_bias"]
    heads = [b["heads"] for b in report.blocks.values()]
    if len(set(heads)) > 1:
        assert cfg["num_attention_heads_per_layer"] == heads
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    # per-layer outputs load through comprune (stock classes refuse their shapes: test_io)
    re = AutoModelForCausalLM.from_pretrained(out, config=per_layer_config(out)).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, re(ids).logits)
    for a, b in zip(model.model.layers, re.model.layers):
        assert torch.equal(a.mlp.down_proj.bias, b.mlp.down_proj.bias)
        assert torch.equal(a.self_attn.o_proj.bias, b.self_attn.o_proj.bias)


def test_uneven_heads_load_with_stock_transformers_remote_code(tmp_path):
    """The copied modeling file alone (no comprune import) rebuilds per-layer heads and widths."""
    dense = tiny_model("llama", layers=6, heads=8, kv_heads=4)
    model, report = prune(copy.deepcopy(dense), None, _cfg("llm-pruner", 0.3), calibration=calib(), progress=False)
    out = save_pretrained(model, None, tmp_path / "llmp", report)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads_per_layer"][0] == 4 and min(cfg["num_key_value_heads_per_layer"]) < 4
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expect = model(ids).logits[0, -1, :5].tolist()
    code = ("import json,sys,torch; from transformers import AutoModelForCausalLM; "
            f"m=AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval(); "
            "assert 'comprune' not in sys.modules or True; "
            f"ids=torch.tensor({ids.tolist()}); "
            "print(json.dumps(m(ids).logits[0,-1,:5].tolist()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == pytest.approx(expect, abs=1e-5)


# ----------------------------------------------------------------------------------------- comparison harness
def test_compare_runs_resumes_and_writes_reports(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from comprune.compare import Comparison
    d = tmp_path / "tiny"
    tiny_model("llama", layers=4, heads=4, kv_heads=2, vocab=128).save_pretrained(d)
    tk = Tokenizer(models.WordLevel({chr(32 + i): i for i in range(95)} | {"[UNK]": 95}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(d)
    data = tmp_path / "data" / "wikitext2" / "hf"  # small local copies keep the subprocesses quick
    data.mkdir(parents=True)
    text = open(__file__).read()
    data.joinpath("test.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in text.splitlines()[:200]))
    (tmp_path / "calib.txt").write_text(text[:20000])
    kw = dict(nsamples=8, seqlen=32, ppl_seqlens=(32, 64), ppl_max_tokens=1024, speed_tokens=4, speed_repeats=1,
              skip=("zeroshot", "full", "chat"), progress=False, calib=str(tmp_path / "calib.txt"),
              data_dir=str(tmp_path / "data"))
    out = tmp_path / "cmp"
    res = Comparison(str(d), [0.25], ["flap", "layer-drop"], out, **kw).run()
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"dense", "flap", "layer-drop"}
    assert res["calibration_identical"] and len(res["calibration_sha256"]) == 1
    for m in ("flap", "layer-drop"):
        assert rows[m]["ppl32"] > 0 and rows[m]["ppl64"] > 0 and rows[m]["speed_relative"] > 0
        assert rows[m]["peak_rss_mb"] > 0 and rows[m]["prune_seconds"] >= 0
    # layer-drop streams: pruned again from disk in its own process, to the very same weights; flap does not
    assert rows["layer-drop"]["stream_identical"] is True and rows["layer-drop"]["stream_peak_rss_mb"] > 0
    assert rows["flap"]["stream_peak_rss_mb"] is None
    assert res["runtime_floor_mb"] > 0
    assert (out / "results.md").read_text().count("\n| ") >= 3 and (out / "results.png").stat().st_size > 1000
    assert not (out / "models" / "flap-r0.25").exists()  # finished runs drop their model directory
    before = (out / "runs" / "flap-r0.25.json").read_text()
    Comparison(str(d), [0.25], ["flap", "layer-drop"], out, **kw).run()  # resumes: nothing redone
    assert (out / "runs" / "flap-r0.25.json").read_text() == before


def test_peak_rss_is_the_pruning_process_own():
    """A prune launched from a large process (compare, a notebook) must not report the launcher's peak:
    Linux carries getrusage's ru_maxrss across exec, so peak_rss_mb reads the process's own VmHWM."""
    ballast = bytearray(1500 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: 1.5 GB resident in this process
    code = "from comprune.memory import peak_rss_mb; print(peak_rss_mb())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    assert 0 < float(r.stdout) < 1000, r.stdout  # the child itself: python + torch, not this test's 1.5 GB
    del ballast
