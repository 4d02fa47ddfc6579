"""A prune in a 2-rank gloo group (comprune.distributed) makes the one-process decisions: the same removed blocks,
kept neurons and heads, and logits within float rounding (the statistics are the same sums in another order),
for equal and unequal shares of the windows, and after a rank is killed and the group resumes."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import _distributed_worker as W
from comprune.distributed import batch_counts
from comprune.errors import CompruneError

# Sums over the ranks' batches in another order: float64 statistics, float32 activations. The decisions are
# compared exactly; the logits of a tiny random model (|logit| ~ 1) within this.
ATOL = 1e-4

EQUAL = list(W.SCENARIOS)
UNEQUAL = ["comp", "comp-search", "flap", "llm-pruner"]


@pytest.fixture(scope="module")
def one_process():
    torch.manual_seed(0)
    return {name: W.run(name) for name in EQUAL}


@pytest.fixture(scope="module")
def equal(tmp_path_factory):
    out = tmp_path_factory.mktemp("equal")
    assert W.group(EQUAL, out) == [0, 0]
    return out


@pytest.fixture(scope="module")
def unequal(tmp_path_factory):
    out = tmp_path_factory.mktemp("unequal")
    assert W.group(UNEQUAL, out, env={"COMPRUNE_RANK_SHARES": "4,1"}) == [0, 0]
    return out


def _same_prune(result, ref):
    assert result["removed_layers"] == ref["removed_layers"]
    assert result["blocks"] == {str(k): v for k, v in ref["blocks"].items()}
    diff = (result["logits"] - ref["logits"]).abs().max().item()
    assert diff <= ATOL, diff


def test_batch_counts_share_whole_batches_by_weight():
    assert batch_counts(5, 2) == [3, 2]
    assert batch_counts(5, 2, [4, 1]) == [4, 1]
    assert batch_counts(4, 3, [1, 1, 1]) == [2, 1, 1]
    assert sum(batch_counts(17, 4, [3, 1, 1, 2])) == 17 and min(batch_counts(17, 4, [100, 1, 1, 1])) == 1
    with pytest.raises(CompruneError, match="cannot be shared"):
        batch_counts(1, 2)


@pytest.mark.parametrize("name", EQUAL)
def test_group_prunes_as_one_process(name, equal, one_process):
    rank0, rank1 = W.load(equal / f"0-{name}"), W.load(equal / f"1-{name}")
    _same_prune(rank0, one_process[name])
    # rank 0 decided: every rank holds the same model, bit for bit
    assert rank1["blocks"] == rank0["blocks"] and torch.equal(rank1["logits"], rank0["logits"])
    assert rank0["distributed"] == {"world_size": 2, "backend": "gloo", "shares": None}


@pytest.mark.parametrize("name", UNEQUAL)
def test_unequal_shares_prune_as_one_process(name, unequal, one_process):
    rank0, rank1 = W.load(unequal / f"0-{name}"), W.load(unequal / f"1-{name}")
    _same_prune(rank0, one_process[name])
    assert torch.equal(rank1["logits"], rank0["logits"])
    assert rank0["distributed"]["shares"] == [4.0, 1.0]


@pytest.mark.parametrize("rank", [0, 1])  # rank 0 right after it committed block 2; rank 1 before it could
def test_killed_rank_resumes_to_the_uninterrupted_result(tmp_path, equal, rank):
    ckpt = tmp_path / "ckpt"
    kill = {"COMPRUNE_KILL_AFTER_BLOCK": "2", "COMPRUNE_KILL_RANK": str(rank)}
    codes = W.group(["comp"], tmp_path / "killed", env=kill, ckpt=ckpt)
    assert codes[rank] == -9 and codes[1 - rank] != 0  # its peer was stopped (torchrun's agent does the same)
    assert json.loads((ckpt / "state.json").read_text())["next_block"] == 2 - rank  # mid-run: blocks remain
    assert W.group(["comp"], tmp_path / "resumed", ckpt=ckpt, resume=True) == [0, 0]
    for rank in (0, 1):
        resumed, whole = W.load(tmp_path / "resumed" / f"{rank}-comp"), W.load(equal / f"{rank}-comp")
        assert resumed["blocks"] == whole["blocks"]
        assert torch.equal(resumed["logits"], whole["logits"])


def test_torchrun_cli_prune_writes_once_what_one_process_writes(tmp_path):
    from test_comp import _tiny_dir
    from transformers import AutoModelForCausalLM
    d = _tiny_dir(tmp_path)
    argv = ["prune", d, "--ratio", "0.2", "--nsamples", "8", "--seqlen", "32", "--calib-batch-size", "2", "--json",
            "--out"]
    assert W.cli(argv + [tmp_path / "one"], world=1) == [0]
    assert W.cli(argv + [tmp_path / "two"]) == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "tiny", "two"]  # no checkpoint or temporary left
    one, two = (json.loads((tmp_path / n / "pruning.json").read_text()) for n in ("one", "two"))
    assert two["distributed"] == {"world_size": 2, "backend": "gloo", "shares": None} and "distributed" not in one
    assert two["blocks"].keys() == one["blocks"].keys()
    for k in one["blocks"]:
        assert two["blocks"][k]["kept_neurons"] == one["blocks"][k]["kept_neurons"]
    probe = W.PROBE % 95
    logits = [AutoModelForCausalLM.from_pretrained(tmp_path / n)(input_ids=probe).logits for n in ("one", "two")]
    assert (logits[0] - logits[1]).abs().max().item() <= ATOL


def _mean_gradient(xs: torch.Tensor, ys: torch.Tensor, group: bool) -> torch.Tensor:
    """The gradient of the mean squared error over every rank's tokens (this rank's rows of xs, ys)."""
    from comprune import distributed
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    if group:
        share = distributed.window_share(xs.shape[0], 1)
        xs, ys = xs[share], ys[share]
    ((lin(xs) - ys) ** 2).sum().backward()  # summed over this rank's tokens
    distributed.all_reduce_gradients(lin, tokens=xs.shape[0]) if group else lin.weight.grad.div_(xs.shape[0])
    return lin.weight.grad


def test_recovery_gradients_are_the_mean_over_every_ranks_tokens(tmp_path):
    """What a data-parallel recovery loop calls after its backward, with unequal shares (3 and 1 rows of 4)."""
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(4, 4, generator=g), torch.randn(4, 3, generator=g)

    def body():
        from comprune import distributed
        distributed.init()
        grad = _mean_gradient(xs, ys, group=True)
        save_file({"g": grad.contiguous()}, str(tmp_path / f"grad{distributed.rank()}.safetensors"))
        return 0
    assert W.ranks(body, 2, env={"COMPRUNE_RANK_SHARES": "3,1"}) == [0, 0]
    one = _mean_gradient(xs, ys, group=False)
    for r in (0, 1):
        assert torch.allclose(load_file(str(tmp_path / f"grad{r}.safetensors"))["g"], one, atol=1e-6)


def test_compare_nproc_prunes_through_torchrun(tmp_path):
    from types import SimpleNamespace
    from comprune.compare.measure import prune_command
    cmp = SimpleNamespace(python="py", model_spec="smollm2", calib="c4", nsamples=128, seqlen=128, seed=0,
                          dtype="float32", data_dir=None, prune_args={}, load_flags=[], nproc=2)
    cmd = prune_command(cmp, "comp", 0.2, tmp_path / "out")
    assert cmd[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert cmd[6:8] == ["comprune.cli", "prune"]
    assert prune_command(SimpleNamespace(**{**vars(cmp), "nproc": 1}), "comp", 0.2, tmp_path)[1:3] == \
        ["-m", "comprune.cli"]


def test_collective_timeout_outlasts_a_slow_budget_and_is_checked(monkeypatch):
    """Ranks wait for rank 0's budget resolution longer than torch's 30-minute default; a bad value is refused."""
    from comprune import distributed
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed._timeout() > 30 * 60
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "90")
    assert distributed._timeout() == 90
    for bad in ("0", "soon"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(CompruneError, match=distributed.TIMEOUT_ENV):
            distributed._timeout()
