"""LLM-Pruner's own GQA group score ('folded', as its llama3.py computes it through torch_pruning) against its
formula, and the harness switch between it and the default per-group score (benchmarks/official)."""
import copy

import pytest
import torch

from comprune import CompruneError, PruneConfig, prune
from comprune import scores as S
from comprune.methods.llm_pruner import loss_gradients
from comprune.models import get_adapter
from comprune.surgery import attention_parts, kv_group_channels
from conftest import calib, tiny_model


def _grads(kv_heads):
    model = tiny_model("llama", layers=2, hidden=48, inter=48, heads=6, kv_heads=kv_heads, vocab=64).double()
    for p in model.parameters():
        p.requires_grad_(True)
    loss_gradients(model, torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(4)), batch_size=4)
    adapter = get_adapter(model)
    a = attention_parts(adapter, adapter.layers(model)[0])
    pair = lambda lin: (lin.weight.detach(), lin.weight.grad)  # noqa: E731
    return a, pair


def test_folded_score_credits_query_head_h_to_kv_head_h_mod_nkv():
    a, pair = _grads(kv_heads=2)                      # 6 query heads, 2 KV heads, rep 3
    imp = lambda lin: (lin.weight.detach() * lin.weight.grad).abs()  # noqa: E731
    folded = S.taylor_kv_groups_folded(pair(a.q), pair(a.k), pair(a.v), pair(a.o), a.head_dim, a.rep)
    grouped = S.taylor_kv_groups(pair(a.q), pair(a.k), pair(a.v), pair(a.o), a.head_dim, a.rep)
    hd = a.head_dim
    for g in range(a.n_kv):
        q_heads = [h for h in range(a.n_heads) if h % a.n_kv == g]        # folded: h mod n_kv
        qo = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in q_heads])
        _, kv = kv_group_channels(a, torch.tensor([g]))
        expect = imp(a.q)[qo].sum() + imp(a.o)[:, qo].sum() + imp(a.k)[kv].sum() + imp(a.v)[kv].sum()
        assert folded[g].item() == pytest.approx(expect.item(), rel=1e-12)
    assert not torch.allclose(folded, grouped)         # the two really differ under GQA ...
    assert folded.sum().item() == pytest.approx(grouped.sum().item(), rel=1e-12)  # ... sharing the same total


def test_folded_equals_grouped_without_gqa():
    a, pair = _grads(kv_heads=6)                      # rep 1: every query head has its own KV head
    args = (pair(a.q), pair(a.k), pair(a.v), pair(a.o), a.head_dim, a.rep)
    assert torch.allclose(S.taylor_kv_groups_folded(*args), S.taylor_kv_groups(*args), rtol=1e-12)


def test_llm_pruner_gqa_score_switch_is_recorded_and_checked():
    dense = tiny_model("llama", layers=4, heads=8, kv_heads=4)
    base = dict(method="llm-pruner", ratio=0.3, batch_size=8)
    extra = {"taylor_nsamples": 8, "taylor_seqlen": 32}
    _, rep = prune(copy.deepcopy(dense), None, PruneConfig(**base, extra={**extra, "gqa_score": "folded"}),
                   calibration=calib(), progress=False)
    assert rep.details["taylor"]["gqa_score"] == "folded"
    from comprune.methods.llm_pruner import GQA_SCORES, taylor_group_score
    assert taylor_group_score(PruneConfig(**base, extra=extra)) is GQA_SCORES["group"]  # the default
    with pytest.raises(CompruneError, match="gqa_score"):
        prune(copy.deepcopy(dense), None, PruneConfig(**base, extra={**extra, "gqa_score": "heads"}),
              calibration=calib(), progress=False)
