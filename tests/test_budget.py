"""comprune.budget: plans that never write the configuration, targets resolved to a new one, and the target's
record carried by the report."""
import json

import pytest
import torch

from comprune.budget import plan_budget, settled, speedup_blocks
from comprune.config import PruneConfig
from comprune.errors import CompruneError
from comprune.models.adapters import get_adapter
from conftest import tiny_model


def _fake_table(cache, src, qtype="f16", c=0.1, a=0.35, m=0.55):
    """A cached latency table for `src`, so resolving a speed target times nothing."""
    from comprune.export.latency import _key
    from comprune.files import read_config
    path = cache / "latency" / f"{_key(read_config(src), qtype, torch.get_num_threads())}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {"c": c, "a": a, "m": m, "qtype": qtype, "threads": torch.get_num_threads(), "cpu": "x",
             "points": [[1.0, 0.5, 0.8]], "version": 2}
    path.write_text(json.dumps(table))
    return table


def test_plans_take_the_ratio_to_try():
    model = tiny_model("llama", layers=8, inter=512)
    adapter = get_adapter(model)
    cfg = PruneConfig(ratio=0.2, layer_share=0.5).validate()
    assert plan_budget(model, adapter, cfg, ratio=0.35) == plan_budget(
        model, adapter, PruneConfig(ratio=0.35, layer_share=0.5).validate())
    assert cfg.ratio == 0.2
    narrow = PruneConfig(ratio=0.2, min_width=256).validate()
    with pytest.raises(CompruneError, match=r"ratio 0\.7 needs"):  # the message names the ratio tried
        plan_budget(model, adapter, narrow, ratio=0.7)


@pytest.mark.parametrize("target", [1.05, 1.2, 1.5])
def test_speedup_blocks_is_the_search_plans_minimum(target):
    from comprune.methods.search import make_plan
    model = tiny_model("llama", layers=8, inter=512)
    adapter = get_adapter(model)
    table = {"c": 0.1, "a": 0.35, "m": 0.55}
    for ratio in (0.2, 0.4):
        cfg = PruneConfig(ratio=ratio, width_allocation="search", search_speedup=target, latency=table).validate()
        b = plan_budget(model, adapter, cfg)
        try:
            plan = make_plan(model, adapter, [], b.neurons_per_layer, cfg)
        except CompruneError:
            with pytest.raises(CompruneError, match="beyond this ratio's reach"):
                speedup_blocks(model, adapter, cfg)
            continue
        assert speedup_blocks(model, adapter, cfg) == (plan.min_removed, plan.speedup["predicted_at_minimum"])


def test_resolve_returns_a_new_config(tmp_path, monkeypatch):
    from comprune.budget.targets import resolve
    from test_gguf import VOCAB, save
    src = save(tiny_model("llama", vocab=VOCAB, layers=6, inter=1024), tmp_path / "m")
    monkeypatch.setenv("COMPRUNE_CACHE", str(tmp_path / "cache"))
    _fake_table(tmp_path / "cache", src)
    cfg = PruneConfig(ratio=0.3).validate()
    before = cfg.to_dict()
    assert resolve(src, cfg) == (cfg, None)
    got, rec = resolve(src, cfg, target_speedup=1.2, show=False)
    assert cfg.to_dict() == before and got is not cfg
    assert rec["kind"] == "target_speedup" and got.ratio == rec["ratio"] != 0.3 and got.round_to == 32
    search = PruneConfig(ratio=0.3, width_allocation="search").validate()
    got, rec = resolve(src, search, target_speedup=1.1, with_ratio=True, show=False)
    assert got.ratio == 0.3 and got.search_speedup == 1.1 and set(got.latency) == {"c", "a", "m"}
    assert search.search_speedup == 0 and rec["with_ratio"] and rec["min_removed_blocks"] >= 0
    with pytest.raises(CompruneError, match="add --preset comp-search"):
        resolve(src, cfg, target_speedup=1.1, with_ratio=True)
    with pytest.raises(CompruneError, match="needs a model directory"):
        resolve(tmp_path / "nowhere", cfg, target_size="1MB")


def test_the_report_carries_the_target():
    from comprune.prune import PruneReport
    rec = {"kind": "target_speedup", "ratio": 0.3, "with_ratio": True, "predicted_at_minimum": 1.1}
    details = {"search": {"speedup": {"predicted": 1.15}}}
    assert settled(rec, details)["predicted"] == 1.15 and settled(rec, {})["predicted"] == 1.1
    assert settled(None, details) is None and settled({"kind": "target_size"}, details) == {"kind": "target_size"}
    report = PruneReport("comp", 0.3, 0.3, 10, 7, [], [0], [4], 0.0, 0.0, {}, {}, {})
    assert "target" not in report.to_dict() and "target_speedup" not in report.to_dict()
    report.target = settled(rec, details)
    assert report.to_dict()["target_speedup"]["predicted"] == 1.15 and "target" not in report.to_dict()
