"""Pruned models round-trip: stock transformers (uniform), comprune / trust_remote_code (per-layer widths),
byte-identical re-saves, and atomic writes."""
import json
import subprocess
import sys

import pytest
import torch

import comprune
from comprune import Calibration, PruneConfig, prune, save_pretrained
from comprune.errors import CompruneError
from comprune.models import get_adapter
from comprune.surgery import drop_layers, finalize_config, prune_mlp
from _reliability import word_tokenizer
from conftest import tiny_model

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(4))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def uniform_pruned(family="llama"):
    calib = Calibration(torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0)), "random", 0)
    model, report = prune(tiny_model(family, layers=6), None, PruneConfig(ratio=0.3, layer_share=0.7, batch_size=4),
                          calibration=calib, progress=False)
    return model, report


def nonuniform_pruned(family="llama"):
    model = tiny_model(family, layers=5)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(1)
    for i, width in enumerate([128, 96, 40, 0, 72]):
        keep = torch.randperm(128, generator=g)[:width].sort().values
        prune_mlp(adapter, adapter.layers(model)[i], keep, torch.rand(width, generator=g) + 0.5)
    drop_layers(model, adapter, [1])
    finalize_config(model, adapter)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_uniform_loads_in_stock_transformers(tmp_path, family):
    from transformers import AutoModelForCausalLM
    model, report = uniform_pruned(family)
    assert model.config.model_type == family
    save_pretrained(model, None, tmp_path / "m", report)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == family and "auto_map" not in cfg
    assert cfg["num_hidden_layers"] == len(report.kept_layers) and cfg["intermediate_size"] == report.mlp_widths[0]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert torch.equal(logits(model), logits(again))
    man = comprune.read_manifest(tmp_path / "m")
    assert man["kept_layers"] == report.kept_layers and man["params_after"] == report.params_after


def test_nonuniform_roundtrip_comprune_and_remote_code(tmp_path):
    model = nonuniform_pruned()
    assert model.config.model_type == "comprune_llama"
    assert model.config.intermediate_sizes == [128, 40, 0, 72]
    expect = logits(model)
    save_pretrained(model, word_tokenizer(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_comprune.CompruneLlamaForCausalLM"
    assert cfg["model_type"] == "llama"  # stock AutoTokenizer reads it without remote code
    assert (tmp_path / "m" / "modeling_comprune.py").is_file()
    again, _ = comprune.from_pretrained(tmp_path / "m")
    assert type(again).__name__ == "CompruneLlamaForCausalLM" and again.config.model_type == "comprune_llama"
    assert torch.equal(expect, logits(again))
    # the stock class without trust_remote_code refuses the per-layer shapes: never a wrong model
    from transformers import AutoModelForCausalLM
    with pytest.raises(RuntimeError, match="mismatch|per-layer attribute"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    # outputs of earlier versions (model_type comprune_llama in config.json) still load
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "comprune_llama"}))
    assert torch.equal(expect, logits(comprune.from_pretrained(tmp_path / "m")[0]))
    # stock transformers in a fresh process, no comprune import: remote code from the directory
    code = ("import sys, torch; from transformers import AutoModelForCausalLM as A; "
            f"m = A.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True, dtype=torch.float32).eval(); "
            "assert 'comprune' not in sys.modules; "
            f"torch.save(m(torch.tensor({IDS.tolist()})).logits.detach(), {str(tmp_path / 'l.pt')!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.equal(expect, torch.load(tmp_path / "l.pt"))
    # generate works with renumbered layers and a zero-width MLP
    out = again.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_second_save_is_byte_identical(tmp_path):
    model, report = uniform_pruned()
    save_pretrained(model, None, tmp_path / "a", report)
    save_pretrained(model, None, tmp_path / "b", report)
    for f in ("model.safetensors", "config.json", "pruning.json", "generation_config.json"):
        if (tmp_path / "a" / f).exists():
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_refuses_overwrite_and_crash_leaves_nothing(tmp_path):
    model, report = uniform_pruned()
    save_pretrained(model, None, tmp_path / "m", report)
    with pytest.raises(CompruneError, match="--force"):
        save_pretrained(model, None, tmp_path / "m", report)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, None, tmp_path / "crash", report, _crash_after_weights=True)
    assert not (tmp_path / "crash").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    # --force replaces atomically
    save_pretrained(model, None, tmp_path / "m", report, force=True)
    assert (tmp_path / "m" / "pruning.json").exists()


def test_load_dir_via_comprune_load(tmp_path):
    model = nonuniform_pruned("qwen2")
    save_pretrained(model, None, tmp_path / "m")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                            unk_token="[UNK]").save_pretrained(tmp_path / "m")
    again, tok = comprune.load(str(tmp_path / "m"))
    assert type(again).__name__ == "CompruneQwen2ForCausalLM"
    assert torch.equal(logits(model), logits(again))
