"""Width search (width_allocation="search"): DP optimality, exact budgets, determinism, resume, and that the
stitched model the search scores is the model the database describes."""
import copy
import dataclasses
import itertools
import random

import pytest
import torch
from conftest import calib, masked_dense_logits, tiny_model

from comprune import PruneConfig, prune
from comprune.errors import CompruneError
from comprune.methods.search import Database, Fitness, build_database, dp_allocate, evolve, make_ladder, mutate
from comprune.models import get_adapter
from comprune.surgery import drop_layers, finalize_config, prune_mlp
from comprune.walk import capture, forward_block


def test_dp_is_optimal_on_a_hand_built_table():
    rng = random.Random(0)
    costs = {i: [0.0] + sorted(rng.uniform(0, 5) for _ in range(4)) for i in (0, 2, 3, 5)}
    costs[2][3] = 0.01  # a non-convex curve: greedy by marginal cost would miss it
    for total in range(0, 17):
        got = dp_allocate(costs, total)
        assert sum(got.values()) == total
        best = min((sum(costs[i][lv] for i, lv in zip(sorted(costs), combo)), combo)
                   for combo in itertools.product(range(5), repeat=4) if sum(combo) == total)
        assert sum(costs[i][got[i]] for i in costs) == pytest.approx(best[0])


def test_mutations_keep_the_budget_and_the_ladder():
    rng = random.Random(1)
    levels = {0: 0, 1: 3, 4: 5, 7: 2}
    for _ in range(200):
        levels = mutate(levels, 5, rng, rng.randint(1, 3))
        assert sum(levels.values()) == 10 and all(0 <= v <= 5 for v in levels.values())


def _search_cfg(**kw):
    return PruneConfig(ratio=0.25, layer_share=0.0, batch_size=4, width_allocation="search", search_nsamples=4,
                       search_levels=8, search_generations=3, search_offspring=4, **kw)


def test_search_prune_keeps_the_budget_is_deterministic_and_equals_masked_dense():
    dense = tiny_model("llama", layers=4)
    runs = []
    for _ in range(2):
        model, rep = prune(copy.deepcopy(dense), None, _search_cfg(), calibration=calib(20, 16), progress=False)
        runs.append((model, rep))
    (model, rep), (_, rep2) = runs
    assert rep.mlp_widths == rep2.mlp_widths and rep.details["search"]["trace"] == rep2.details["search"]["trace"]
    # the same number of neurons goes as under the uniform plan, only placed differently
    _, uni = prune(copy.deepcopy(dense), None, PruneConfig(ratio=0.25, layer_share=0.0, batch_size=4),
                   calibration=calib(16, 16), progress=False)
    assert sum(rep.mlp_widths) == sum(uni.mlp_widths)
    assert abs(rep.ratio_achieved - 0.25) < 0.01
    trace = [f for _, f in rep.details["search"]["trace"]]
    assert all(b <= a for a, b in zip(trace, trace[1:]))  # the parent only ever improves
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(ids).logits
    assert torch.allclose(got, masked_dense_logits(dense, rep, ids, pruned=model), atol=1e-4, rtol=0)


def _fitness(model, cfg, root):
    adapter = get_adapter(model)
    adapter.prepare(model)  # Phi-3: gate/up split, as prune() does first
    ids = calib(16, 16).input_ids
    n = adapter.mlp(adapter.layers(model)[0]).down.in_features
    ladder = make_ladder(n, cfg)
    kept = list(range(len(adapter.layers(model))))
    db = build_database(model, adapter, capture(model, adapter, ids[:12], 4, "cpu"), kept, ladder, cfg,
                        Database(root), False)
    return Fitness(model, adapter, [], db, ids[12:], cfg), ladder, db


def test_database_resumes_block_by_block(tmp_path):
    """The variants live on disk, one file per block; a rebuild keeps the blocks already there and rebuilds a
    missing one bit for bit."""
    model = tiny_model("llama", layers=3)
    _, ladder, db = _fitness(model, _search_cfg(), tmp_path / "db")
    files = sorted((tmp_path / "db").glob("block*.safetensors"))
    assert len(files) == 3
    before = {f.name: f.stat().st_mtime_ns for f in files}
    lost = db.variant(1, ladder.top)
    files[1].unlink()
    _fitness(model, _search_cfg(), tmp_path / "db")
    assert {f.name: f.stat().st_mtime_ns for f in (files[0], files[2])} == {f.name: before[f.name]
                                                                           for f in (files[0], files[2])}
    again = db.variant(1, ladder.top)
    assert torch.equal(lost[0], again[0]) and torch.equal(lost[1], again[1])


def test_single_windows_score_what_their_batches_score(tmp_path):
    """The cheap stages read windows one by one (kwargs sliced per row): over all windows they must give the
    batched KL."""
    model = tiny_model("llama", layers=3)
    fit, ladder, _ = _fitness(model, _search_cfg(), tmp_path)
    levels = {0: 1, 1: ladder.top, 2: 2}
    assert fit(levels, fit.windows) == pytest.approx(fit(levels), rel=1e-5)
    assert fit(levels) > fit({0: 0, 1: 0, 2: 0}) >= 0


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_error_curves_stacked_equal_one_call_per_level(family, tmp_path):
    """The error curves run the blocks after block i once on every level stacked: the same KL as one call per
    level (Gemma: sliding-window masks broadcast over the stacked rows)."""
    model = tiny_model(family, layers=3)
    fit, ladder, _ = _fitness(model, _search_cfg(), tmp_path)
    few = fit.windows[:2]
    inputs = fit.block_inputs(few)
    base = {0: 0, 1: 0, 2: 0}
    for i in (0, 1):
        one_by_one = [fit({**base, i: lv}, few, start=i, acts=inputs[i]) for lv in range(1, ladder.top + 1)]
        assert fit.curve(i, range(1, ladder.top + 1), few, inputs[i]) == pytest.approx(one_by_one, rel=1e-4, abs=1e-9)
        assert one_by_one[-1] > one_by_one[0] > 0


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_population_scores_what_one_call_per_kid_scores(family, tmp_path):
    """The evolution scores its offspring together (shared prefixes, one stacked batch per level): the same KL
    as one call per kid, on single windows and on whole batches, with a block removed whole among them."""
    model = tiny_model(family, layers=3)
    fit, ladder, _ = _fitness(model, _search_cfg(), tmp_path)
    fit.removed_level = ladder.top + 1
    kids = [{0: 1, 1: 2, 2: 0}, {0: 1, 1: 2, 2: 0}, {0: 1, 1: 0, 2: ladder.top}, {0: 0, 1: ladder.top + 1, 2: 2},
            {0: 2, 1: 2, 2: 1}]
    parent = {0: 1, 1: 2, 2: 1}
    (_,), (traj,) = fit.population([parent], record=True)
    for windows in (fit.windows[:2], None):
        one_by_one = [fit(k, windows) for k in kids]
        assert fit.population(kids, windows) == pytest.approx(one_by_one, rel=1e-4, abs=1e-9)
        assert fit.population(kids, windows, parent=(parent, traj)) == pytest.approx(one_by_one, rel=1e-4, abs=1e-9)
        assert one_by_one[0] == one_by_one[1] and len(set(one_by_one[1:])) == 4
    # a kid run from its parent's trajectory records, bit for bit, the trajectory a fresh run computes (resume)
    (f1,), (t1,) = fit.population([kids[4]], parent=(parent, traj), record=True)
    (f2,), (t2,) = fit.population([kids[4]], record=True)
    assert f1 == f2 and all(torch.equal(a, b) for pa, pb in zip(t1, t2) for a, b in zip(pa, pb))


def test_evolution_resumes_where_it_was_killed(tmp_path):
    model = tiny_model("llama", layers=3)
    cfg = _search_cfg()
    fit, ladder, _ = _fitness(model, cfg, tmp_path / "db")
    start = {0: 2, 1: 2, 2: 2}
    straight, trace = evolve(fit, start, ladder.top, cfg.replace(search_generations=4), None, False)
    # "killed" after two generations: its state file stays
    evolve(fit, start, ladder.top, cfg.replace(search_generations=2), tmp_path / "search.json", False)
    resumed, trace2 = evolve(fit, start, ladder.top, cfg.replace(search_generations=4), tmp_path / "search.json",
                             False)
    assert resumed == straight and trace2 == trace and sum(resumed.values()) == 6


@pytest.mark.parametrize("family", ["llama", "granite", "gemma2"])
def test_kl_from_moments_equals_kl_from_log_probabilities(family, tmp_path):
    """With an affine head the dense distribution is kept as three per-token moments (Granite: logits scaled;
    Gemma 2: soft-capped, so its log-probabilities are kept): the KL they give is the textbook one."""
    model = tiny_model(family, layers=3)
    fit, ladder, _ = _fitness(model, _search_cfg(), tmp_path)
    x0 = type(fit.x0)(fit.x0.hidden[:1], fit.x0.kwargs[:1])
    dense = fit._run(x0, fit.kept).hidden[0]
    h = fit._run(x0, fit.kept, {0: 1, 1: ladder.top, 2: 2}).hidden[0]
    with torch.inference_mode():
        logits = lambda x: fit._logits(fit._normed(x))  # noqa: E731
        p, q = torch.log_softmax(logits(dense), -1), torch.log_softmax(logits(h), -1)
    want = float((p.exp() * (p - q)).sum())
    assert fit._kl_sum(fit.ref[0], h) == pytest.approx(want, rel=1e-3)
    assert fit._kl_sum(fit.ref[0], dense) == pytest.approx(0, abs=1e-4 * h.shape[0] * h.shape[1])
    assert (family == "gemma2") != (type(fit.ref[0]).__name__ == "_Moments")


@pytest.mark.parametrize("family", ["llama", "phi3", "opt", "gemma3_text"])
def test_stitched_model_equals_the_physically_pruned_one(family, tmp_path):
    """What the search scores (each MLP cut to its variant's neurons while it runs) is the model that slicing to
    the database's variants builds (Phi-3: split gate/up; OPT: biased fc1, no gate; Gemma 3: post-norms)."""
    model = tiny_model(family, layers=3)
    cfg = _search_cfg()
    fit, ladder, db = _fitness(model, cfg, tmp_path)
    levels = {0: 1, 1: ladder.top, 2: 0}
    adapter = get_adapter(model)
    dense = {i: (torch.arange(adapter.mlp(b).down.in_features), adapter.mlp(b).down.weight.detach().clone())
             for i, b in enumerate(adapter.layers(model))}
    variant = lambda i, lv: db.variant(i, lv) if lv else dense[i]  # noqa: E731  (level 0: the dense block)
    stitched = fit._run(type(fit.x0)(fit.x0.hidden[:1], fit.x0.kwargs[:1]), fit.kept, levels).hidden[0]
    pruned = copy.deepcopy(model)
    adapter = get_adapter(pruned)
    for i, lv in levels.items():
        idx, W = variant(i, lv)
        layer = adapter.layers(pruned)[i]
        prune_mlp(adapter, layer, idx)
        with torch.no_grad():
            adapter.mlp(layer).down.weight.copy_(W)
    drop_layers(pruned, adapter, [])
    finalize_config(pruned, adapter)
    x = capture(pruned, adapter, calib(16, 16).input_ids[12:16], 4, "cpu")
    for layer in adapter.layers(pruned):
        x = forward_block(layer, x)
    assert [len(variant(i, lv)[0]) for i, lv in levels.items()] == [adapter.mlp(b).down.in_features
                                                                for b in adapter.layers(pruned)]
    assert torch.allclose(stitched, x.hidden[0], atol=1e-5, rtol=0), (stitched - x.hidden[0]).abs().max()


def test_a_fresh_run_never_resumes_an_old_search(tmp_path):
    """Starting over (not --resume) clears the search's state and database with the rest of the checkpoint."""
    from comprune.checkpoint import Checkpoint
    ckpt = Checkpoint(tmp_path / "ckpt", "fingerprint")
    ckpt.dir.mkdir(parents=True, exist_ok=True)
    (ckpt.dir / "search.json").write_text("{}")
    Database(ckpt.dir / "search-db").save(0, [(torch.arange(2), torch.ones(3, 2))])
    ckpt.clear()
    assert not (ckpt.dir / "search.json").exists() and not (ckpt.dir / "search-db").exists()


def test_removal_mutations_keep_the_budget():
    """With block removal, a mutation may remove a block (level R, paid by others) or restore one: the total
    stays, every level is on the ladder or R, and only removable blocks are ever removed."""
    rng = random.Random(2)
    levels = {0: 2, 1: 3, 2: 4, 3: 1, 4: 2}
    seen = set()
    for _ in range(400):
        levels = mutate(levels, 5, rng, rng.randint(1, 3), removed_level=9, removable=(1, 2, 3))
        assert sum(levels.values()) == 12
        assert all(0 <= v <= 5 or (v == 9 and i in (1, 2, 3)) for i, v in levels.items())
        seen.add(tuple(i for i, v in levels.items() if v == 9))
    assert len(seen) > 2  # blocks do go and come back


def test_search_removes_a_block_that_does_nothing():
    """A block whose output projections are zero is the identity: with --search-layers the search removes it
    (it costs nothing and pays for many levels), the budget stays exact and the pruned model equals the masked
    dense one."""
    dense = tiny_model("llama", layers=5)
    with torch.no_grad():
        get_adapter(dense).layers(dense)[2].self_attn.o_proj.weight.zero_()
        get_adapter(dense).layers(dense)[2].mlp.down_proj.weight.zero_()
    cfg = _search_cfg(search_layers=True).replace(ratio=0.3)
    model, rep = prune(copy.deepcopy(dense), None, cfg, calibration=calib(20, 16), progress=False)
    search = rep.details["search"]
    assert search["removed_blocks"] == [2] and rep.removed_layers == [2]
    assert abs(rep.ratio_achieved - 0.3) < 0.005
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(ids).logits
    assert torch.allclose(got, masked_dense_logits(dense, rep, ids, pruned=model), atol=1e-4, rtol=0)


def test_dp_with_a_minimum_of_removed_blocks_is_optimal():
    """The speed budget's DP: at least `min_removed` blocks at the removal level, the total exact, and the
    least cost among all such allocations (brute force)."""
    rng = random.Random(4)
    R = 6
    costs = {i: [0.0] + sorted(rng.uniform(0, 5) for _ in range(3)) + [float("inf")] * 2 + [rng.uniform(2, 9)]
             for i in range(4)}
    for min_removed in range(3):
        for total in range(0, 19):
            combos = [c for c in itertools.product([0, 1, 2, 3, R], repeat=4)
                      if sum(c) == total and sum(v == R for v in c) >= min_removed]
            if not combos:
                with pytest.raises(ValueError):
                    dp_allocate(costs, total, R, min_removed)
                continue
            got = dp_allocate(costs, total, R, min_removed)
            assert sum(got.values()) == total and sum(v == R for v in got.values()) >= min_removed
            best = min(sum(costs[i][lv] for i, lv in zip(range(4), c)) for c in combos)
            assert sum(costs[i][got[i]] for i in costs) == pytest.approx(best)


def test_a_speed_budget_with_a_ratio_removes_the_blocks_it_needs():
    """--ratio with --target-speedup: the parameter budget stays exact, the search removes at least the blocks the
    latency table says the speed needs, its allocation is predicted to reach the target, and the pruned model still
    equals the masked dense one."""
    from comprune.budget import predicted_speedup

    dense = tiny_model("llama", layers=6)
    table = {"c": 0.2, "a": 0.5, "m": 0.3}  # block overhead dominates: speed comes from removing whole blocks
    cfg = dataclasses.replace(_search_cfg(search_speedup=1.2, latency=table), ratio=0.3)
    model, rep = prune(copy.deepcopy(dense), None, cfg.validate(), calibration=calib(20, 16), progress=False)
    speed = rep.details["search"]["speedup"]
    assert speed["min_removed_blocks"] >= 1 and len(rep.removed_layers) >= speed["min_removed_blocks"]
    assert abs(rep.ratio_achieved - 0.3) < 0.005
    kept = sum(rep.mlp_widths)  # the kept blocks' MLP widths
    assert len(rep.mlp_widths) == 6 - len(rep.removed_layers)
    pred = predicted_speedup(table, (6 - len(rep.removed_layers)) / 6, kept / (6 * dense.config.intermediate_size))
    assert pred == pytest.approx(speed["predicted"]) and pred >= 1.2 - 1e-9
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(ids).logits
    assert torch.allclose(got, masked_dense_logits(dense, rep, ids, pruned=model), atol=1e-4, rtol=0)
    with pytest.raises(CompruneError, match="beyond this ratio's reach"):
        bad = _search_cfg(search_speedup=5.0, latency=table)
        prune(copy.deepcopy(dense), None, bad.validate(), calibration=calib(20, 16), progress=False)
