"""The recovery stages (comprune.recover) in a 2-rank gloo group: each rank trains on its part of every step's
windows, the gradients and the held-out KL are summed over the ranks, so the group folds (or merges) the model one
process makes, up to the order of the sums, for equal and unequal shares; both ranks end with the same bytes."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import _distributed_worker as W
from conftest import calib

# The same steps in another order of summation (the gradients over the ranks' windows, the held-out KL): the
# logits of the tiny random model (|logit| ~ 1) after the stage, and its held-out KL curve, within these.
ATOL, KL_ATOL = 1e-4, 1e-6
HELDOUT = 4  # the calibration's last windows (no tokenizer): 10 train windows in batches of 4, 4, 2


def calibration():
    """10 random windows, then 4 of them again as the held-out windows: held out from random tokens, the KL would
    not fall and the best scales would be the untrained ones (a stage that changed nothing)."""
    from comprune import Calibration
    ids = calib(W.WINDOWS, W.SEQLEN).input_ids
    return Calibration(torch.cat([ids, ids[:HELDOUT]]), "random", 0)

STAGES = {
    "tune": lambda R: R.Recovery(tune=R.TuneOptions(steps=6, batch=4, eval_every=2, patience=3, lr=0.02),
                                 heldout=HELDOUT),
    "tune-pull": lambda R: R.Recovery(tune=R.TuneOptions(train=("neurons", "heads", "channels"), pull=0.1,
                                                         steps=5, batch=4, eval_every=2, lr=0.02), heldout=HELDOUT),
    "distill": lambda R: R.Recovery(distill=R.DistillOptions(tokens=6 * 4 * W.SEQLEN, batch=4, eval_every=3,
                                                             lr=1e-3, bf16="off"), heldout=HELDOUT),
}
EQUAL, UNEQUAL = list(STAGES), ["tune", "tune-pull"]


def run(name: str, ckpt=None, resume=False) -> dict:
    """COMP then the stage on a tiny Llama: the stage's record and the model's logits on a fixed probe."""
    from comprune import PruneConfig, prune
    from comprune import recover as R
    cfg = PruneConfig(batch_size=2, nsamples=W.WINDOWS + HELDOUT, seqlen=W.SEQLEN, **W.SCENARIOS["comp"])
    pruned, rep = prune(copy.deepcopy(W.MODEL), None, cfg, calibration=calibration(),
                        progress=False, recovery=STAGES[name](R), checkpoint_dir=ckpt, resume=resume)
    with torch.no_grad():
        logits = pruned(input_ids=W.PROBE).logits.float()
    keep = ("steps", "tokens", "heldout_kl", "best_step", "stopped", "data_sha256", "heldout_sha256",
            "heldout_tokens", "world_size", "trained", "lora_params")
    return {"stage": {k: v for k, v in rep.stages[0].items() if k in keep}, "logits": logits}


def group(names, out, env=None, ckpt=None, resume=False) -> list[int]:
    def body():
        import os
        for name in names:
            res = run(name, ckpt=ckpt, resume=resume)
            path = out / f"{os.environ['RANK']}-{name}"
            save_file({"logits": res["logits"].contiguous()}, str(path.with_suffix(".safetensors")))
            path.with_suffix(".json").write_text(json.dumps(res["stage"]))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    return W.ranks(body, 2, env)


def load(path) -> dict:
    return {"stage": json.loads(path.with_suffix(".json").read_text()),
            "logits": load_file(str(path.with_suffix(".safetensors")))["logits"]}


@pytest.fixture(scope="module")
def one_process():
    return {name: run(name) for name in EQUAL}


@pytest.fixture(scope="module")
def equal(tmp_path_factory):
    out = tmp_path_factory.mktemp("equal")
    assert group(EQUAL, out) == [0, 0]
    return out


@pytest.fixture(scope="module")
def unequal(tmp_path_factory):
    out = tmp_path_factory.mktemp("unequal")
    assert group(UNEQUAL, out, env={"COMPRUNE_RANK_SHARES": "4,1"}) == [0, 0]  # steps of 4 windows: 3 + 1
    return out


def _same_stage(got, ref):
    a, b = dict(got["stage"]), dict(ref["stage"])
    assert a.pop("world_size") == 2 and b.pop("world_size") == 1
    curve_a, curve_b = a.pop("heldout_kl"), b.pop("heldout_kl")
    assert a == b  # steps, tokens, best step, why it stopped, the data's digests and token counts
    assert [s for s, _ in curve_a] == [s for s, _ in curve_b]
    assert max(abs(x - y) for (_, x), (_, y) in zip(curve_a, curve_b)) <= KL_ATOL
    assert b["best_step"] > 0  # the folded model is a trained one (its held-out KL below the untrained one)
    diff = (got["logits"] - ref["logits"]).abs().max().item()
    assert diff <= ATOL, diff


@pytest.mark.parametrize("name", EQUAL)
def test_group_stage_gives_the_one_process_model(name, equal, one_process):
    rank0, rank1 = load(equal / f"0-{name}"), load(equal / f"1-{name}")
    _same_stage(rank0, one_process[name])
    assert rank1["stage"] == rank0["stage"] and torch.equal(rank1["logits"], rank0["logits"])


@pytest.mark.parametrize("name", UNEQUAL)
def test_unequal_shares_tune_as_one_process(name, unequal, one_process):
    rank0, rank1 = load(unequal / f"0-{name}"), load(unequal / f"1-{name}")
    _same_stage(rank0, one_process[name])
    assert rank1["stage"] == rank0["stage"] and torch.equal(rank1["logits"], rank0["logits"])


def test_killed_group_resumes_tune_to_the_uninterrupted_result(tmp_path, equal):
    """Rank 0 alone writes the stage's checkpoint; after a kill at its step-4 evaluation both ranks resume from
    what rank 0 reads."""
    ckpt = tmp_path / "ckpt"
    codes = group(["tune"], tmp_path / "killed", env={"COMPRUNE_KILL_AFTER_STEP": "tune:4"}, ckpt=ckpt)
    assert codes[0] == -9 and codes[1] != 0
    assert json.loads((ckpt / "tune.json").read_text())["progress"]["step"] == 4
    assert group(["tune"], tmp_path / "resumed", ckpt=ckpt, resume=True) == [0, 0]
    for rank in (0, 1):
        resumed, whole = load(tmp_path / "resumed" / f"{rank}-tune"), load(equal / f"{rank}-tune")
        assert resumed["stage"] == whole["stage"] and torch.equal(resumed["logits"], whole["logits"])


def test_torchrun_cli_tune_writes_once_what_one_process_writes(tmp_path):
    from test_comp import _tiny_dir
    d = _tiny_dir(tmp_path)
    argv = ["prune", d, "--ratio", "0.2", "--nsamples", "8", "--seqlen", "32", "--calib-batch-size", "2", "--tune",
            "--tune-steps", "4", "--tune-eval-every", "2", "--recover-heldout", "4", "--json", "--out"]
    assert W.cli(argv + [tmp_path / "one"], world=1) == [0]
    assert W.cli(argv + [tmp_path / "two"]) == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "tiny", "two"]  # no checkpoint left
    one, two = (json.loads((tmp_path / n / "pruning.json").read_text())["stages"][0] for n in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["steps"] == two["steps"] and one["data_sha256"] == two["data_sha256"]
    assert max(abs(x - y) for (_, x), (_, y) in zip(one["heldout_kl"], two["heldout_kl"])) <= KL_ATOL
