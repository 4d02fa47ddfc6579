"""A method is one module plus one `register(...)` call (tests/plugin_act_norm.py, no other file edited): it runs
through the Python API, `comprune prune` (its options made from its dataclass), `--stream`, a kill and
`--resume`, and `comprune compare`. And every registered method resumes to the same bytes after a kill."""
from __future__ import annotations

import copy
import importlib
import json
import os
from pathlib import Path

import pytest
import torch

from comprune import PruneConfig, prune, registry
from comprune.errors import CompruneError
from _reliability import calib_text, jobs, main, same_weights, tiny_dir
from conftest import calib, masked_dense_logits, tiny_model

HERE = Path(__file__).parent
SMALL = ["--nsamples", "4", "--seqlen", "32", "--calib-batch-size", "2", "--dtype", "float32"]


@pytest.fixture
def act_norm(monkeypatch):
    """The plug-in registered here, and found by child processes through $COMPRUNE_PLUGINS."""
    import plugin_act_norm
    if "act-norm" not in registry.names():
        importlib.reload(plugin_act_norm)
    monkeypatch.setenv("COMPRUNE_PLUGINS", "plugin_act_norm")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    yield registry.get("act-norm")
    registry.unregister("act-norm")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugins")
    return {"src": tiny_dir(root / "tiny"), "text": calib_text(root / "calib.txt")}


def _bytes(d: Path) -> dict:
    """The model files of an output (pruning.json, the card and the recipe aside: they hold times and paths)."""
    return {f.name: f.read_bytes() for f in sorted(Path(d).iterdir())
            if f.name not in ("pruning.json", "README.md", "recipe.json")}


def test_plugin_through_the_python_api(act_norm):
    dense = tiny_model("llama", layers=4)
    cfg = PruneConfig(method="act-norm", ratio=0.3, power=2.0, batch_size=4)
    model, report = prune(copy.deepcopy(dense), None, cfg, calibration=calib(), progress=False)
    assert abs(report.ratio_achieved - 0.3) < 0.005 and report.config["power"] == 2.0
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, masked_dense_logits(dense, report, ids, pruned=model), atol=1e-5)
    with pytest.raises(CompruneError, match="power"):
        PruneConfig(method="act-norm", power=-1.0)
    with pytest.raises(CompruneError, match="option of act-norm"):
        PruneConfig(method="comp", power=2.0)


def test_plugin_through_the_cli_and_streamed(act_norm, files, tmp_path, capsys):
    args = ["prune", files["src"], "--method", "act-norm", "--power", "2", "--ratio", "0.3", *SMALL,
            "--calib", files["text"], "--json"]
    code, err = main([*args, "--out", tmp_path / "mem"], capsys)
    assert code == 0, err
    code, err = main([*args, "--out", tmp_path / "stream", "--stream"], capsys)
    assert code == 0, err
    assert same_weights(tmp_path / "mem", tmp_path / "stream")
    manifest = json.loads((tmp_path / "mem" / "pruning.json").read_text())
    assert manifest["method"] == "act-norm" and manifest["config"]["power"] == 2.0
    code, err = main(["prune", files["src"], "--method", "comp", "--power", "2", "--out", tmp_path / "x", *SMALL,
                      "--calib", files["text"]], capsys)
    assert code == 2 and "option of act-norm" in err


@pytest.mark.parametrize("method", ["comp", "layer-drop", "wanda-sp", "magnitude", "flap", "llm-pruner", "act-norm"])
def test_every_method_resumes_after_a_kill_at_any_block(act_norm, files, tmp_path, method):
    """Killed right after the plan (block 0), in the middle and after the last block: --resume gives the same
    bytes as the uninterrupted run."""
    assert set(registry.names()) >= {"comp", "layer-drop", "wanda-sp", "magnitude", "flap", "llm-pruner"}
    args = ["prune", files["src"], "--method", method, "--ratio", "0.3", *SMALL, "--calib", files["text"], "--json"]
    ref = tmp_path / "ref"
    kills = [0, 2, 4] if method != "layer-drop" else [0, 4]  # layer-drop may remove block 1 (never saved)
    outs = {k: tmp_path / f"k{k}" for k in kills}
    res = jobs([{"argv": [*args, "--out", ref]}] +
               [{"argv": [*args, "--out", outs[k]], "env": {"COMPRUNE_KILL_AFTER_BLOCK": str(k)}} for k in kills],
               tmp_path)
    assert res[0]["rc"] == 0, res[0]["stderr"][-2000:]
    for k, r in zip(kills, res[1:]):
        assert r["rc"] == -9, (k, r["rc"], r["stderr"][-1500:])
    resumed = jobs([{"argv": [*args, "--out", outs[k], "--resume"]} for k in kills], tmp_path)
    want = _bytes(ref)
    for k, r in zip(kills, resumed):
        assert r["rc"] == 0, (k, r["stderr"][-1500:])
        assert _bytes(outs[k]) == want, f"{method}: killed after block {k}, resumed to other bytes"


def test_plugin_in_compare(act_norm, tmp_path):
    from comprune.compare import Comparison
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    d = tmp_path / "tiny"
    tiny_model("llama", layers=4, heads=4, kv_heads=2, vocab=128).save_pretrained(d)
    tk = Tokenizer(models.WordLevel({chr(32 + i): i for i in range(95)} | {"[UNK]": 95}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(d)
    data = tmp_path / "data" / "wikitext2" / "hf"
    data.mkdir(parents=True)
    text = open(__file__).read()
    data.joinpath("test.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in text.splitlines()))
    (tmp_path / "calib.txt").write_text(text * 3)
    res = Comparison(str(d), [0.25], ["act-norm"], tmp_path / "cmp", nsamples=8, seqlen=32, ppl_seqlens=(32,),
                     ppl_max_tokens=512, speed_tokens=4, speed_repeats=1, skip=("zeroshot", "full", "chat"), progress=False,
                     calib=str(tmp_path / "calib.txt"), data_dir=str(tmp_path / "data")).run()
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"dense", "act-norm"} and rows["act-norm"]["ppl32"] > 0
    assert rows["act-norm"]["stream_identical"] is True  # its record says it streams: compare streamed it too
