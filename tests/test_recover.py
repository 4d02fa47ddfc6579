"""Recovery stages after a prune (comprune.recover): end-to-end mask tuning and LoRA distillation, on tiny models."""
import json

import pytest
import torch

from conftest import tiny_model
from _reliability import calib_text, jobs, tiny_dir, word_tokenizer
from comprune import prune
from comprune.config import PruneConfig
from comprune.data import get_calibration
from comprune.errors import CompruneError
from comprune.loading import count_params
from comprune.models import get_adapter
from comprune.recover import DenseTargets, DistillOptions, Recovery, TuneOptions
from comprune.recover.tune import Scales

CFG = PruneConfig(ratio=0.3, nsamples=24, seqlen=32, head_share=0.3)


@pytest.fixture(scope="module")
def text_calib(tmp_path_factory):
    path = calib_text(tmp_path_factory.mktemp("recover") / "calib.txt", words=3000)
    return word_tokenizer(), get_calibration(word_tokenizer(), str(path), 24, 32, 0)


def _pruned(tok, calib, recovery=None):
    model = tiny_model("llama", layers=4)
    return prune(model, tok, CFG, calibration=calib, progress=False, recovery=recovery)


def test_tune_lowers_heldout_kl_and_never_adds_parameters(text_calib):
    tok, calib = text_calib
    rec = Recovery(tune=TuneOptions(steps=16, eval_every=4, patience=3, lr=0.02), heldout=4)
    plain, rep0 = _pruned(tok, calib)
    tuned, rep = _pruned(tok, calib, rec)
    st = rep.stages[0]
    assert st["stage"] == "tune" and st["steps"] > 0 and st["trained"] > 0
    assert count_params(tuned) == count_params(plain) == rep0.params_after == rep.params_after
    assert [tuple(p.shape) for p in tuned.parameters()] == [tuple(p.shape) for p in plain.parameters()]
    # measured again on the folded model, against the dense model's held-out distributions
    from comprune.recover import heldout_ids
    held, _, _ = heldout_ids(tok, calib, 4)
    targets = DenseTargets.capture(tiny_model("llama", layers=4), held)
    before, after = targets.kl(plain), targets.kl(tuned)
    assert after < before * 0.99, (before, after)
    assert after == pytest.approx(st["kl_after"], rel=1e-4)
    assert st["kl_before"] == pytest.approx(before, rel=1e-4)
    assert 1 - 0.5 <= st["scale_range"][0] <= st["scale_range"][1] <= 1 + 0.5


def test_folded_model_equals_scaled_model():
    """Folding multiplies the scales into the weights: logits equal the hooked model's within float32 rounding."""
    model = tiny_model("llama", layers=3)
    adapter = get_adapter(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    scales = Scales(model, adapter, TuneOptions(train=("neurons", "heads", "channels"), bound=0.5))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in scales.theta.values():
            t.copy_(torch.randn(t.shape, generator=g))
    scales.attach()
    with torch.no_grad():
        hooked = model(ids).logits
    scales.detach()
    with torch.no_grad():
        plain = model(ids).logits
    scales.fold()
    with torch.no_grad():
        folded = model(ids).logits
    assert (hooked - plain).abs().max() > 1e-2  # the scales change the model
    assert (folded - hooked).abs().max() <= 1e-4 * hooked.abs().max()


def test_options_refused_in_one_line():
    with pytest.raises(CompruneError, match="--tune-train"):
        TuneOptions(train="neurons,experts")
    with pytest.raises(CompruneError, match="--tune-bound"):
        TuneOptions(bound=1.5)
    for bad, match in ((dict(data="c5"), "unknown dataset 'c5'"), (dict(data="self:0.5,nofile.txt:0.5"), "nofile.txt"),
                       (dict(train="full"), "lora or weights"), (dict(seqlen=-1), "seqlen")):
        with pytest.raises(CompruneError, match=match):
            DistillOptions(**bad)
    assert (DistillOptions().lr, DistillOptions(train="weights").lr, DistillOptions(train="weights", lr=3e-4).lr) == (
        1e-3, 1e-4, 3e-4)  # each kind of training its own default step size, unless one is given


@pytest.mark.parametrize("train, lr", [("lora", 1e-3), ("weights", 1e-4)])
def test_distill_merges_into_same_shapes_and_reloads_in_transformers(text_calib, tmp_path, train, lr):
    from transformers import AutoModelForCausalLM
    from comprune.io import save_pretrained
    from comprune.recover.distill import linear_names
    tok, calib = text_calib
    cfg = PruneConfig(ratio=0.2, nsamples=24, seqlen=32)  # uniform widths: a stock config
    plain, _ = prune(tiny_model("llama", layers=4), tok, cfg, calibration=calib, progress=False)
    opts = DistillOptions(tokens=16 * 4 * 32, batch=4, eval_every=8, lr=lr, bf16="off", train=train)
    model, rep = prune(tiny_model("llama", layers=4), tok, cfg, calibration=calib, progress=False,
                       recovery=Recovery(distill=opts, heldout=4))
    st = rep.stages[0]
    assert st["stage"] == "distill" and st["steps"] == 16 and st["kl_after"] < st["kl_before"]
    if train == "weights":  # every adapted layer's weight trained, nothing else
        modules = dict(model.named_modules())
        assert st["trained_params"] == sum(modules[n].weight.numel() for n in linear_names(model, get_adapter(model)))
        assert torch.equal(model.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in plain.named_parameters()}
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    save_pretrained(model, tok, tmp_path / "out", rep)
    manifest = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert manifest["stages"][0]["heldout_kl"][0][0] == 0 and manifest["stages"][0]["data_sha256"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = calib.input_ids[:2]
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, model(ids).logits, atol=1e-5)


KILLS = {"tune": ("--tune", "--tune-steps", "12", "--tune-batch", "2"),
         "distill": ("--recover", "distill", "--recover-tokens", "1536", "--recover-lr", "0.001",
                     "--recover-eval-every", "4", "--recover-data", "c4"),
         "distill-weights": ("--recover", "distill", "--recover-train", "weights", "--recover-tokens", "1536",
                             "--recover-lr", "0.0001", "--recover-eval-every", "4")}


def _strip(obj):
    """A manifest without its timings and memory."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in ("seconds", "peak_rss_mb", "targets_seconds")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    root = tmp_path_factory.mktemp("recover-kill")
    src = tiny_dir(root / "tiny", layers=4)
    text = calib_text(root / "calib.txt", words=3000)

    def job(name, out, *extra, env=None):
        return {"argv": ["prune", str(src), "--ratio", "0.3", "--nsamples", "24", "--seqlen", "32", "--calib",
                         str(text), "--recover-heldout", "4", "--out", str(root / name / out), "--json",
                         *KILLS[name], *extra], "env": env or {}}
    first = jobs([j for name in KILLS for j in (
        job(name, "ref"), job(name, "out", env={"COMPRUNE_KILL_AFTER_STEP": f"{name.split('-')[0]}:8"}))], root)
    second = jobs([job(name, "out", "--resume") for name in KILLS], root)
    return root, {name: (first[2 * i], first[2 * i + 1], second[i]) for i, name in enumerate(KILLS)}


@pytest.mark.parametrize("name", list(KILLS))
def test_kill_and_resume_reproduces_the_uninterrupted_result(killed, name):
    root, runs = killed
    ref, kill, resumed = runs[name]
    assert ref["rc"] == 0, ref["stderr"][-2000:]
    assert kill["rc"] == -9, kill["stderr"][-1000:]
    assert resumed["rc"] == 0, resumed["stderr"][-2000:]
    out, base = root / name / "out", root / name / "ref"
    assert (out / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    a, b = (json.loads((d / "pruning.json").read_text()) for d in (out, base))
    assert a["stages"][0]["stage"] == name.split("-")[0] and a["stages"][0]["steps"] > 8
    assert _strip(a) == _strip(b)
    assert not (root / name / ".out.checkpoint").exists()


def test_streamed_prune_refuses_recovery_in_one_line(tmp_path, capsys):
    from _reliability import main
    src = tiny_dir(tmp_path / "tiny", layers=4)
    code, err = main(["prune", src, "--stream", "--tune", "--out", tmp_path / "out"], capsys)
    assert code != 0 and "--stream" in err and len(err.strip().splitlines()) == 1, err


def test_compare_rows_with_recovery_stages(tmp_path):
    """comp+tune, comp-search+tune, comp-search+distill are rows of a comparison: their method's (or preset's)
    prune with the stage's flags; they never stream; an unknown stage is refused in one line."""
    from comprune.compare.measure import prune_command
    from comprune.compare.runner import Comparison
    from comprune.compare.stages import ROWS
    src = tiny_dir(tmp_path / "tiny", layers=4)
    cmp = Comparison(str(src), ratios=(0.2,), methods=ROWS, out_dir=tmp_path / "c", progress=False)
    cmd = prune_command(cmp, "comp-search+distill", 0.2, tmp_path / "m")
    assert cmd[cmd.index("--preset") + 1] == "comp-search" and cmd[cmd.index("--recover") + 1] == "distill"
    cmd = prune_command(cmp, "comp+tune", 0.2, tmp_path / "m")
    assert cmd[cmd.index("--method") + 1] == "comp" and "--tune" in cmd
    assert not cmp.needed("comp+tune-r0.20", "stream", {"method": "comp+tune", "ratio": 0.2, "prune": {}})
    with pytest.raises(CompruneError, match=r"\+tune or \+distill"):
        Comparison(str(src), ratios=(0.2,), methods=("comp+finetune",), out_dir=tmp_path / "d", progress=False)


def test_training_windows_take_the_calibration_then_more_of_c4():
    """tokens 0: the calibration windows; fewer tokens: their first windows; more (C4 only, whose held-out documents
    are a source of their own): the calibration windows first, then other windows of the source."""
    from comprune.data import Calibration
    from comprune.recover.stage import training_windows
    ids = torch.arange(8 * 16).reshape(8, 16)
    text = Calibration(ids, "text", 0)
    assert torch.equal(training_windows(None, text, ids, 0, False), ids)
    assert torch.equal(training_windows(None, text, ids, 3 * 16, False), ids[:3])
    assert torch.equal(training_windows(word_tokenizer(), text, ids, 20 * 16, False), ids)  # not C4: no more
    c4 = get_calibration(word_tokenizer(), "c4", 8, 16, 0)
    more = training_windows(word_tokenizer(), c4, c4.input_ids, 20 * 16, False)
    assert more.shape == (20, 16) and torch.equal(more[:8], c4.input_ids)
    assert torch.equal(training_windows(word_tokenizer(), c4, c4.input_ids, 20 * 16, True), c4.input_ids)


def test_stages_read_windows_as_the_walk_does():
    """A family trained with <bos> first (Gemma) sees <bos> as every window's first token in the stages' targets, as
    in the walk; the digest stays the text's, and families without it see the windows as they are."""
    ids = torch.randint(5, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    gemma = tiny_model("gemma3_text")
    t = DenseTargets.capture(gemma, ids, 2)
    assert all((b[:, 0] == gemma.config.bos_token_id).all() and torch.equal(b[:, 1:], w[:, 1:])
               for b, w in zip(t.ids, ids.split(2)))
    assert t.digest == DenseTargets.capture(tiny_model("llama"), ids, 2).digest
    assert all(torch.equal(b, w) for b, w in zip(DenseTargets.capture(tiny_model("llama"), ids, 2).ids, ids.split(2)))


def test_distill_steps_back_to_the_best_adapters_at_a_smaller_step(text_calib):
    """A held-out evaluation that does not improve sends the adapters back to the best ones and multiplies the step
    size by `decay`; the merged model is the best one (its held-out KL the curve's minimum)."""
    tok, calib = text_calib
    cfg = PruneConfig(ratio=0.2, nsamples=24, seqlen=32)
    opts = DistillOptions(tokens=64 * 2 * 32, batch=2, eval_every=2, lr=0.3, clip=0, patience=3, bf16="off")
    model, rep = prune(tiny_model("llama", layers=4), tok, cfg, calibration=calib, progress=False,
                       recovery=Recovery(distill=opts, heldout=4))
    st = rep.stages[0]
    curve = [kl for _, kl in st["heldout_kl"]]
    worse = sum(b >= min(curve[:i]) for i, b in enumerate(curve) if i)  # evaluations that did not improve
    decays = worse - (st["stopped"] == "held-out KL stopped falling")  # the stopping evaluation changes nothing
    assert decays >= 1 and st["lr_last"] == pytest.approx(0.3 * 0.5 ** decays)
    assert st["kl_after"] == min(curve)
    with pytest.raises(CompruneError, match="decay"):
        DistillOptions(decay=0)
