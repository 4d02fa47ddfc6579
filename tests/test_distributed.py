"""A prune in a 2-rank gloo group (comprune.distributed) makes the one-process decisions: the same removed blocks,
kept neurons and heads, and logits within float rounding (the statistics are the same sums in another order),
for equal and unequal shares of the windows, and after a rank is killed and the group resumes."""
import pytest
import torch

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


def test_killed_rank_resumes_to_the_uninterrupted_result(tmp_path, equal):
    ckpt = tmp_path / "ckpt"
    kill = {"COMPRUNE_KILL_AFTER_BLOCK": "2", "COMPRUNE_KILL_RANK": "1"}
    codes = W.group(["comp"], tmp_path / "killed", env=kill, ckpt=ckpt)
    assert codes[1] == -9 and codes[0] != 0  # rank 1 died; its peer was stopped (torchrun's agent does the same)
    assert (ckpt / "state.json").is_file()
    assert W.group(["comp"], tmp_path / "resumed", ckpt=ckpt, resume=True) == [0, 0]
    for rank in (0, 1):
        resumed, whole = W.load(tmp_path / "resumed" / f"{rank}-comp"), W.load(equal / f"{rank}-comp")
        assert resumed["blocks"] == whole["blocks"]
        assert torch.equal(resumed["logits"], whole["logits"])
