"""Outputs that serving stacks load: per-layer models carry transformers 5's `per_layer_config` (what vLLM's
Transformers backend reads through `config.per_layer_config[i]`) and `auto_map["AutoModel"]` (the base model it
builds), while comprune's loader and stock transformers keep working."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import comprune
from comprune import save_pretrained
from comprune.models import get_adapter
from comprune.surgery import finalize_config, prune_heads, prune_mlp
from _reliability import word_tokenizer
from conftest import tiny_model

transformers = pytest.importorskip("transformers")
if not hasattr(transformers.PretrainedConfig, "per_layer_config"):
    pytest.skip("transformers without per_layer_config (before 5.x's heterogeneous configs)", allow_module_level=True)

IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))


def per_layer_model(heads: bool = True):
    """Uneven MLP widths [128, 128, 43, 0] and (`heads`) GQA groups: query heads [4, 2, 4, 2], KV [2, 1, 2, 1]."""
    model = tiny_model("llama", layers=4, heads=4, kv_heads=2)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    if heads:
        prune_heads(adapter, layers[1], torch.tensor([1]))
        prune_heads(adapter, layers[3], torch.tensor([0]))
    prune_mlp(adapter, layers[2], torch.arange(0, 128, 3))
    prune_mlp(adapter, layers[3], torch.arange(0))
    finalize_config(model, adapter)
    return model.eval()


def tensor_shapes(model_dir):
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_layers_match(layer_configs, shapes):
    """Every layer config's width and head counts are the shapes of that layer's tensors."""
    assert len(layer_configs) == 4
    for i, lc in enumerate(layer_configs):
        p = f"model.layers.{i}."
        assert shapes[p + "mlp.down_proj.weight"][1] == lc.intermediate_size
        assert shapes[p + "mlp.up_proj.weight"][0] == lc.intermediate_size
        assert shapes[p + "self_attn.q_proj.weight"][0] == lc.num_attention_heads * lc.head_dim
        assert shapes[p + "self_attn.k_proj.weight"][0] == lc.num_key_value_heads * lc.head_dim
        assert shapes[p + "self_attn.o_proj.weight"][1] == lc.num_attention_heads * lc.head_dim


def test_per_layer_config_round_trips_through_transformers_and_matches_tensors(tmp_path):
    from transformers import AutoConfig, LlamaConfig
    model = per_layer_model(heads=False)
    out = save_pretrained(model, word_tokenizer(), tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["per_layer_config"] == {"2": {"intermediate_size": 43}, "3": {"intermediate_size": 0}}
    assert cfg["auto_map"]["AutoModel"] == "modeling_comprune.CompruneLlamaModel"
    shapes = tensor_shapes(out)
    # stock transformers' own config class: heterogeneous, and it serializes the same per_layer_config back
    stock = AutoConfig.from_pretrained(out)
    assert type(stock) is LlamaConfig and stock.is_heterogeneous
    assert stock.to_dict()["per_layer_config"] == cfg["per_layer_config"]
    assert LlamaConfig(**stock.to_dict()).to_dict()["per_layer_config"] == cfg["per_layer_config"]
    check_layers_match(stock.per_layer_config, shapes)
    # comprune's per-layer config answers the same interface from its lists, its globals still readable
    own = comprune.from_pretrained(out)[0].config
    assert own.is_heterogeneous and own.intermediate_size == 128 and own.intermediate_sizes == [128, 128, 43, 0]
    check_layers_match(own.per_layer_config, shapes)
    # a config that holds only per_layer_config (another tool's) fills comprune's lists from it
    bare = {k: v for k, v in cfg.items() if k != "intermediate_sizes"}
    again = type(own)(**bare)
    assert again.intermediate_sizes == [128, 128, 43, 0]
    assert again.to_dict()["per_layer_config"] == cfg["per_layer_config"]
    # comprune's lists win over a stale per_layer_config (a config rebuilt from an older one's to_dict)
    stale = type(own)(**{**cfg, "per_layer_config": {"1": {"intermediate_size": 7}}})
    assert stale.intermediate_sizes == [128, 128, 43, 0]


def test_per_layer_heads_in_the_config_class_and_a_config_json_stock_transformers_reads(tmp_path):
    """transformers 5's Llama config checks hidden_size % num_attention_heads on the global value, so query heads
    that vary cannot be in config.json's per_layer_config (stock AutoConfig, and so AutoTokenizer, would fail):
    comprune's config class, which vLLM loads through auto_map, gives every layer's heads and widths itself."""
    from transformers import AutoConfig
    model = per_layer_model()
    out = save_pretrained(model, word_tokenizer(), tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert "per_layer_config" not in cfg and cfg["num_key_value_heads_per_layer"] == [2, 1, 2, 1]
    assert AutoConfig.from_pretrained(out).model_type == "llama"  # stock still reads it
    own = comprune.from_pretrained(out)[0].config
    assert own.is_heterogeneous and own.num_attention_heads == 4 and own.num_key_value_heads == 2
    assert own.to_dict().get("per_layer_config") is None
    check_layers_match(own.per_layer_config, tensor_shapes(out))
    assert not any(lc.is_heterogeneous for lc in own.per_layer_config)  # vLLM converts each layer on its own
    # another tool's config whose per_layer_config holds heads fills the head lists too
    overrides = {"1": {"num_attention_heads": 2, "num_key_value_heads": 1}, "2": {"intermediate_size": 43}}
    mine = ("intermediate_sizes", "num_attention_heads_per_layer", "num_key_value_heads_per_layer")
    again = type(own)(**{k: v for k, v in cfg.items() if k not in mine}, per_layer_config=overrides)
    assert again.num_attention_heads_per_layer == [4, 2, 4, 4] and again.intermediate_sizes == [128, 128, 43, 128]


def test_uniform_model_has_no_per_layer_config(tmp_path):
    from transformers import AutoConfig
    model = tiny_model("llama", layers=3)
    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        prune_mlp(adapter, layer, torch.arange(0, 128, 2))
    finalize_config(model, adapter)
    out = save_pretrained(model, None, tmp_path / "u")
    cfg = json.loads((out / "config.json").read_text())
    assert "per_layer_config" not in cfg and "auto_map" not in cfg
    assert not AutoConfig.from_pretrained(out).is_heterogeneous


def test_auto_model_builds_the_base_model_from_remote_code(tmp_path):
    """As vLLM's Transformers backend does: the config through remote code, its per-layer view, then
    AutoModel (the base model, no LM head) from the directory alone, in a process without comprune."""
    model = per_layer_model()
    out = save_pretrained(model, word_tokenizer(), tmp_path / "m")
    with torch.no_grad():
        expect = model.model(IDS).last_hidden_state[0, -1, :6].tolist()
    code = ("import json, sys, torch; from transformers import AutoConfig, AutoModel; "
            f"c = AutoConfig.from_pretrained({str(out)!r}, trust_remote_code=True); "
            "layers = [(l.intermediate_size, l.num_attention_heads, l.num_key_value_heads) for l in c.per_layer_config]; "
            f"m = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32).eval(); "
            "assert 'comprune' not in sys.modules; "
            f"h = m(torch.tensor({IDS.tolist()})).last_hidden_state[0, -1, :6].tolist(); "
            "print(json.dumps([type(m).__name__, c.is_heterogeneous, layers, h, type(m).is_backend_compatible()]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    name, het, layers, hidden, compatible = json.loads(r.stdout.strip().splitlines()[-1])
    assert name == "CompruneLlamaModel" and het and compatible  # vLLM checks is_backend_compatible()
    assert layers == [[128, 4, 2], [128, 2, 1], [43, 4, 2], [0, 2, 1]]
    assert hidden == pytest.approx(expect, abs=1e-5)


def test_stock_tokenizer_loads_and_stock_model_class_refuses_without_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = save_pretrained(per_layer_model(heads=False), word_tokenizer(), tmp_path / "m")
    assert AutoTokenizer.from_pretrained(out)("a b").input_ids
    # transformers refuses a global read of a per-layer width: never a wrong model
    with pytest.raises(RuntimeError, match="per-layer attribute"):
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
