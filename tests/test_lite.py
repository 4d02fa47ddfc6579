"""comprune's plain-PyTorch Llama-family modules (streamed prunes) compute bit for bit what transformers' do."""
import subprocess
import sys

import pytest
import torch

from comprune.models import get_adapter, lite
from comprune.surgery import finalize_config, prune_heads, prune_mlp
from comprune.walk import capture, forward_block
from conftest import tiny_model


def _lite_twin(hf):
    twin = lite.build(hf.config, torch.float32)
    twin.load_state_dict(hf.state_dict(), strict=True, assign=True)
    twin.tie_weights()
    return twin


def _check_same(hf, twin, seqlen=24):
    adapter = get_adapter(hf)
    ids = torch.randint(0, hf.config.vocab_size, (6, seqlen), generator=torch.Generator().manual_seed(1))
    a, b = capture(hf, adapter, ids, 4, "cpu"), capture(twin, get_adapter(twin), ids, 4, "cpu")
    for ka, kb in zip(a.kwargs, b.kwargs):
        assert ka["attention_mask"] is None and kb["attention_mask"] is None
        assert all(torch.equal(x, y) for x, y in zip(ka["position_embeddings"], kb["position_embeddings"]))
    for la, lb in zip(adapter.layers(hf), adapter.layers(twin)):
        a, b = forward_block(la, a), forward_block(lb, b)
        assert all(torch.equal(x, y) for x, y in zip(a.hidden, b.hidden))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, twin(ids))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_lite_blocks_equal_transformers(family):
    hf = tiny_model(family, layers=3, heads=4, kv_heads=2)
    if family == "qwen2":  # q/k/v biases
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.1)
                layer.self_attn.k_proj.bias.normal_(0, 0.1)
    assert lite.supports(hf.config, 24) is None
    twin = _lite_twin(hf)
    assert twin.architecture == type(hf).__name__
    _check_same(hf, twin)


def test_lite_llama_biases_equal_transformers():
    """attention_bias / mlp_bias (FLAP's bias compensation turns them on) are honoured like transformers does."""
    from transformers import AutoModelForCausalLM
    from conftest import randomize, tiny_config
    cfg = tiny_config("llama", layers=2)
    cfg.attention_bias, cfg.mlp_bias = True, True
    hf = randomize(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), seed=0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    _check_same(hf, _lite_twin(hf))


def test_lite_pruned_widths_and_heads_equal_transformers():
    """comprune's per-layer config (uneven MLP widths, GQA groups pruned per layer) builds the same shapes."""
    hf = tiny_model("llama", layers=3, heads=4, kv_heads=2)
    adapter = get_adapter(hf)
    for i, layer in enumerate(adapter.layers(hf)):
        prune_mlp(adapter, layer, torch.arange(128 - 24 * i))
    prune_heads(adapter, adapter.layers(hf)[1], torch.tensor([1]))
    finalize_config(hf, adapter)
    assert hf.config.model_type == "comprune_llama"
    twin = _lite_twin(hf)
    assert twin.architecture == type(hf).__name__ == "CompruneLlamaForCausalLM"
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    _check_same(hf, twin)


def test_lite_mistral_default_window_and_rope_scaling():
    hf = tiny_model("mistral", layers=2)
    hf.config.sliding_window = 4096  # Mistral's default: longer than the windows, so no mask either way
    _check_same(hf, _lite_twin(hf))
    hf = tiny_model("llama", layers=2)
    hf.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    hf.model.rotary_emb = LlamaRotaryEmbedding(hf.config)
    _check_same(hf, _lite_twin(hf))


def test_lite_declines_what_it_does_not_cover():
    cfg = tiny_model("mistral", layers=2).config
    cfg.sliding_window = 16
    assert "sliding window" in lite.supports(cfg, 32)
    assert lite.supports(cfg, 16) is None
    cfg = tiny_model("llama", layers=2).config
    cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert "RoPE" in lite.supports(cfg, 32)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    cfg.hidden_act = "gelu"
    assert "activation" in lite.supports(cfg, 32)


def test_import_does_not_load_transformers_modeling():
    """What keeps a streamed prune's floor low: comprune (and its registered classes) import without it."""
    code = ("import sys, comprune, comprune.stream, comprune.methods; "
            "bad = [m for m in sys.modules if m == 'transformers.modeling_utils']; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
