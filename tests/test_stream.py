"""Streaming prune (one block in memory, read from safetensors shards) equals the in-memory prune."""
import json
import random
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from comprune import Calibration, PruneConfig, load, prune, prune_streaming, save_pretrained
from comprune.errors import CompruneError
from comprune.models import get_adapter
from comprune.surgery import finalize_config, prune_mlp
from conftest import tiny_model

VOLATILE = ("seconds", "peak_rss_mb", "streaming")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel({chr(32 + i): i for i in range(95)} | {"[UNK]": 95}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[UNK]")


def _sharded(path, model):
    model.save_pretrained(path, max_shard_size="50KB")
    _tokenizer().save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 5
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    out = {"llama": _sharded(root / "llama", tiny_model("llama", layers=6))}  # tied lm_head
    # untied lm_head, and MLP widths that already differ per layer (comprune's config + modeling file)
    m = tiny_model("mistral", layers=5)
    adapter = get_adapter(m)
    for i, layer in enumerate(adapter.layers(m)):
        prune_mlp(adapter, layer, torch.arange(128 - 8 * i))
    finalize_config(m, adapter)
    out["uneven"] = _sharded(root / "uneven", m)
    return out


def calib(n=4, t=32):
    return Calibration(torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(0)), "random", 0)


def _strip(manifest):
    out = {k: v for k, v in manifest.items() if k not in VOLATILE}
    if "search" in out.get("details", {}):  # the search's own wall-clock time
        out["details"] = {**out["details"], "search": {k: v for k, v in out["details"]["search"].items()
                                                       if k != "seconds"}}
    return out


def _weights(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"] \
        if (d / "model.safetensors.index.json").is_file() else None
    files = sorted(set(index.values())) if index else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(d / f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("name,cfg", [
    ("llama", dict(ratio=0.3, layer_share=0.7)),                    # blocks removed + neurons, tied head
    ("uneven", dict(ratio=0.2, layer_share=0.3)),                   # untied head, per-layer widths in and out
    ("llama", dict(ratio=0.3, method="wanda-sp")),                  # a forward-only baseline streams unchanged
    ("llama", dict(ratio=0.3, method="magnitude")),                 # data-free, each block changed while held
    ("llama", dict(ratio=0.3, layer_share=0.3, extra={"mlp_rebuild": "r"})),  # residual + dense MLP copy, spilled
    ("uneven", dict(ratio=0.2, layer_share=0.5, layer_score="loss")),  # the LM head read from disk while needed
    ("llama", dict(ratio=0.3, layer_share=0.3, width_allocation="adaptive")),  # an extra pass over the blocks
    ("llama", dict(ratio=0.3, layer_share=0.0, head_share=0.3, head_unit="kv")),    # KV groups pruned inside the walk too
    # the width search: its variant database, error curves and evolution read each block while resident
    ("llama", dict(ratio=0.3, width_allocation="search", search_generations=3, search_nsamples=2)),
    # least squares onto the dense trajectory, a removed span folded into the block before, query heads refitted
    ("llama", dict(ratio=0.3, layer_share=0.7, recovery="least-squares", metric="obs", target_mix=0.5,
                   layer_compensation=True, head_share=0.3)),
])
def test_stream_equals_in_memory(shards, tmp_path, name, cfg):
    src = shards[name]
    config = dict(batch_size=4, **cfg)
    model, tok = load(src)
    model, report = prune(model, tok, PruneConfig(**config), calibration=calib(), progress=False, base_model="m")
    save_pretrained(model, tok, tmp_path / "mem", report)

    out = tmp_path / "stream"
    rep = prune_streaming(src, out, PruneConfig(**config), calibration=calib(), progress=False, base_model="m")
    assert rep.removed_layers == report.removed_layers and rep.params_after == report.params_after
    assert not list(tmp_path.glob(".stream*")), "partial directory or checkpoint left behind"

    # same tensors, same config, same manifest (minus timing and memory)
    a, b = _weights(out), _weights(tmp_path / "mem")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "mem/config.json").read_text())
    assert (out / "modeling_comprune.py").is_file() == (name == "uneven" or "width_allocation" in cfg)
    ma, mb = (json.loads((d / "pruning.json").read_text()) for d in (out, tmp_path / "mem"))
    assert _strip(ma) == _strip(mb)
    assert ma["streaming"]["block_loads"] >= len(rep.kept_layers)
    assert ma["streaming"]["modules"] == "comprune-lite"

    # the output loads and gives the in-memory prune's logits
    streamed, _ = load(out)
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, model(ids).logits)


def test_stream_with_transformers_modules_equals_lite(shards, tmp_path):
    """lite=False (transformers' classes, the fallback for other families) gives the same checkpoint."""
    cfg = PruneConfig(ratio=0.2, layer_share=0.3, batch_size=4)
    reps = {}
    for lite in (True, False):
        reps[lite] = prune_streaming(shards["uneven"], tmp_path / str(lite), cfg, calibration=calib(), progress=False,
                                     base_model="m", lite=lite)
    a, b = _weights(tmp_path / "True"), _weights(tmp_path / "False")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in ("config.json", "generation_config.json", "modeling_comprune.py"):
        assert (tmp_path / "True" / f).read_text() == (tmp_path / "False" / f).read_text()
    assert json.loads((tmp_path / "False" / "pruning.json").read_text())["streaming"]["modules"] == "transformers"
    # the CLI's escape hatch
    from comprune.cli import main
    text = tmp_path / "calib.txt"
    text.write_text(" ".join("abcde fghij klmno"[i % 17: i % 17 + 5] for i in range(400)))
    assert main(["prune", str(shards["llama"]), "--stream", "--stream-transformers-modules", "--ratio", "0.2",
                 "--nsamples", "2", "--seqlen", "16", "--calib", str(text), "--out", str(tmp_path / "cli"),
                 "--json"]) == 0
    assert json.loads((tmp_path / "cli" / "pruning.json").read_text())["streaming"]["modules"] == "transformers"


def test_stream_cli_never_imports_transformers_modeling(shards, tmp_path):
    """The memory floor of a streamed prune: transformers' modeling stack (~130 MB) is never imported."""
    out, text = tmp_path / "out", tmp_path / "calib.txt"
    rng = random.Random(0)
    text.write_text(" ".join("".join(rng.choice("abcdefghij klmnop") for _ in range(6)) for _ in range(300)))
    r = subprocess.run([sys.executable, "-m", "comprune.cli", "prune", str(shards["llama"]), "--stream", "--ratio",
                        "0.2", "--nsamples", "4", "--seqlen", "16", "--calib", str(text), "--out", str(out), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1000:]
    stats = json.loads((out / "pruning.json").read_text())["streaming"]
    assert stats["modules"] == "comprune-lite" and stats["transformers_modeling_imported"] is False
    assert load(out)[1] is not None  # the tokenizer, written by the calibration child


def test_stream_search_from_text_uses_the_heldout_windows(shards, tmp_path):
    """Calibration from a text (tokenised by the child process): the streamed search scores the same held-out
    fitness windows as the in-memory one, which holds the tokenizer, instead of cutting them from the
    calibration windows (a streamed SmolLM2 search once differed from the in-memory prune this way)."""
    text = tmp_path / "calib.txt"
    rng = random.Random(1)
    text.write_text(" ".join("".join(rng.choice("abcdefghij klmnop") for _ in range(6)) for _ in range(600)))
    cfg = dict(ratio=0.3, width_allocation="search", search_generations=2, search_nsamples=2, batch_size=4,
               calib=str(text), nsamples=4, seqlen=16)
    model, tok = load(shards["llama"])
    model, report = prune(model, tok, PruneConfig(**cfg), progress=False, base_model="m")
    save_pretrained(model, tok, tmp_path / "mem", report)
    prune_streaming(shards["llama"], tmp_path / "stream", PruneConfig(**cfg), progress=False, base_model="m")
    ma, mb = (json.loads((tmp_path / d / "pruning.json").read_text()) for d in ("stream", "mem"))
    assert ma["calibration"]["nsamples"] == mb["calibration"]["nsamples"] == 4  # none cut off for the fitness
    assert _strip(ma) == _strip(mb)
    a, b = _weights(tmp_path / "stream"), _weights(tmp_path / "mem")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_llm_pruner_refuses_to_stream(shards, tmp_path):
    with pytest.raises(CompruneError, match="gradients") as e:
        prune_streaming(shards["llama"], tmp_path / "out", PruneConfig(ratio=0.2, method="llm-pruner"),
                        calibration=calib(), progress=False)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def _cli_args(src, out, text, *extra):
    # float32 as the API's reference run below (the CLI's default, auto, is bf16 on a BF16-capable CPU)
    return ["prune", str(src), "--stream", "--ratio", "0.3", "--layer-share", "0.5", "--nsamples", "4", "--seqlen",
            "32", "--calib", str(text), "--out", str(out), "--json", "--dtype", "float32", *extra]


def test_stream_kill_and_resume(shards, tmp_path, capsys):
    from comprune.cli import main
    src = shards["llama"]
    rng = random.Random(0)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join("".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(2, 9)))
                             for _ in range(1000)))
    out = tmp_path / "out"
    from _forked_calibration import forked_calibration
    from _reliability import jobs
    r, = jobs([{"argv": _cli_args(src, out, text), "env": {"COMPRUNE_KILL_AFTER_BLOCK": "3"}}], tmp_path)  # a process
    assert r["rc"] == -9, (r["rc"], r["stderr"][-500:])  # SIGKILL after block 2 was checkpointed
    assert not out.exists(), "a killed run must not leave a directory that looks complete"
    partial = tmp_path / ".out.partial-stream"
    assert json.loads((tmp_path / ".out.checkpoint" / "state.json").read_text())["next_block"] == 3
    assert {p.name for p in partial.glob("block-*")} <= {f"block-{i:05d}.safetensors" for i in range(3)}
    assert not (partial / "config.json").exists()

    with forked_calibration():  # the calibration child as a fork (the real one: test_stream_cli_never_imports_...)
        assert main(_cli_args(src, out, text)) == 2 and "--resume" in capsys.readouterr().err
        assert main(_cli_args(src, out, text, "--resume")) == 0
    assert not partial.exists() and not (tmp_path / ".out.checkpoint").exists()

    # equals an uninterrupted run (same calibration text)
    from comprune.data import get_calibration
    tok = load(src)[1]
    cfg = PruneConfig(ratio=0.3, layer_share=0.5, nsamples=4, seqlen=32, calib=str(text))
    ref = tmp_path / "ref"
    prune_streaming(src, ref, cfg, calibration=get_calibration(tok, str(text), 4, 32, 0), progress=False,
                    base_model=str(src))
    a, b = _weights(out), _weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((d / "pruning.json").read_text()) for d in (out, ref))
    assert _strip(ma) == _strip(mb)
    assert ma["streaming"]["block_loads"] < mb["streaming"]["block_loads"]  # finished blocks were not redone
