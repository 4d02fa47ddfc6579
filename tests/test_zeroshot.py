"""Zero-shot tasks through the real lm-evaluation-harness, offline, on a tiny random Llama."""
import os

import pytest
import torch

os.environ["HF_DATASETS_OFFLINE"] = "1"  # the point of the module: nothing may be fetched
os.environ["HF_HUB_OFFLINE"] = "1"

pytest.importorskip("lm_eval")

from conftest import tiny_model  # noqa: E402

from comprune.data import resolve_data_dir  # noqa: E402
from comprune.errors import CompruneError  # noqa: E402
from comprune.evaluate.zeroshot import (PAPER7, evaluate_zeroshot, format_zeroshot_table,  # noqa: E402
                                        parse_tasks, subset_indices)

try:
    resolve_data_dir()
except CompruneError:
    pytest.skip("shared/data not found (set COMPRUNE_DATA)", allow_module_level=True)


def _bytes_to_unicode():
    """GPT-2's byte -> printable character map: byte-level BPE with no merges = one token per byte."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def model_and_tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    b2u = _bytes_to_unicode()
    tk = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    # eos/pad reuse byte 0 so the vocabulary stays at the tiny model's 256
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=b2u[0], pad_token=b2u[0])
    assert tok.decode(tok("héllo, world")["input_ids"]) == "héllo, world"
    return tiny_model("llama"), tok


def test_two_tasks_with_limit(model_and_tok):
    model, tok = model_and_tok
    r = evaluate_zeroshot(model, tok, "piqa,arc_challenge", limit=8, batch_size=8, progress=False)
    assert {"harness_version", "tasks", "average", "average_metric_note", "subset", "limit", "seconds"} <= set(r)
    assert list(r["tasks"]) == ["piqa", "arc_challenge"] and r["limit"] == 8 and r["subset"] is None
    for name, t in r["tasks"].items():
        assert t["n"] == 8 and t["approximate"] is False
        for m in ("acc", "acc_norm"):
            assert 0.0 <= t[m] <= 1.0 and t[m] * 8 == round(t[m] * 8)  # a count out of 8
            assert t[f"{m}_stderr"] is not None and t[f"{m}_stderr"] >= 0
    assert r["tasks"]["piqa"]["metric"] == "acc" and r["tasks"]["arc_challenge"]["metric"] == "acc_norm"
    assert r["average"] == pytest.approx((r["tasks"]["piqa"]["acc"] + r["tasks"]["arc_challenge"]["acc_norm"]) / 2)
    table = format_zeroshot_table(r)
    assert "piqa" in table and "arc_challenge" in table and "average" in table and "≈" not in table


def test_subset_is_a_fixed_draw_not_the_first_n(model_and_tok):
    a, b = subset_indices(1267, 8), subset_indices(1267, 8)
    assert a == b and a != list(range(8)) and len(set(a)) == 8 and all(0 <= i < 1267 for i in a)
    assert subset_indices(1267, 8, seed=1) != a
    assert subset_indices(5, 8) == list(range(5))  # asking for more than exists takes everything
    model, tok = model_and_tok
    r1 = evaluate_zeroshot(model, tok, ["winogrande"], subset=6, progress=False)
    r2 = evaluate_zeroshot(model, tok, ["winogrande"], subset=6, progress=False)
    assert r1["tasks"]["winogrande"]["n"] == 6 and r1["subset"] == 6
    assert r1["tasks"] == r2["tasks"]
    assert r1["tasks"]["winogrande"]["acc_norm"] is None  # winogrande reports acc only


def test_heldout_examples_are_disjoint_from_the_reported_subset(model_and_tok):
    reported, held = subset_indices(1267, 200), subset_indices(1267, 200, heldout=True)
    assert len(held) == 200 and not set(reported) & set(held) and held == subset_indices(1267, 200, heldout=True)
    assert subset_indices(300, 200, heldout=True) == sorted(set(range(300)) - set(subset_indices(300, 200)))
    model, tok = model_and_tok
    r = evaluate_zeroshot(model, tok, ["winogrande"], subset=6, heldout=True, progress=False, per_example=True)
    assert r["heldout"] and r["tasks"]["winogrande"]["doc_ids"] == subset_indices(1267, 6, heldout=True)
    with pytest.raises(CompruneError, match="needs --subset"):
        evaluate_zeroshot(model, tok, ["winogrande"], heldout=True, progress=False)


def test_hellaswag_is_marked_approximate_and_cache_is_reused(model_and_tok, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRUNE_CACHE", str(tmp_path))
    model, tok = model_and_tok
    r1 = evaluate_zeroshot(model, tok, "hellaswag", limit=4, progress=False, cache_key="tiny/llama",
                           cache_dir=tmp_path / "lm")
    assert r1["tasks"]["hellaswag"]["approximate"] is True and r1["tasks"]["hellaswag"]["n"] == 4
    assert "≈hellaswag" in format_zeroshot_table(r1) and "approximate" in r1["average_metric_note"]
    assert list((tmp_path / "lm").glob("tiny_llama*.db"))
    r2 = evaluate_zeroshot(model, tok, "hellaswag", limit=4, progress=False, cache_key="tiny/llama",
                           cache_dir=tmp_path / "lm")
    assert r2["tasks"] == r1["tasks"]


def test_errors_are_compruneerrors(model_and_tok, tmp_path):
    assert parse_tasks("paper7") == PAPER7 and parse_tasks(["boolq", "paper7"])[0] == "boolq"
    with pytest.raises(CompruneError, match="unknown zero-shot task 'sqaud'"):
        parse_tasks("piqa,sqaud")
    model, tok = model_and_tok
    with pytest.raises(CompruneError, match="not found"):
        evaluate_zeroshot(model, tok, "piqa", limit=2, data_dir=tmp_path, progress=False)
    with pytest.raises(CompruneError, match="both"):
        evaluate_zeroshot(model, tok, "piqa", limit=2, subset=2, progress=False)


def test_hellaswag_rows_rebuild_the_stock_query(tmp_path):
    """A text-extract item converted back must give the stock process_docs query of the original item."""
    import bz2

    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    from comprune.evaluate.zeroshot import _hellaswag_rows
    original = {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
                "endings": ["is using wrap.", "starts pulling up roofing.", "holds a cube.", "is ripping tiles."],
                "label": "3"}
    wikihow = {"activity_label": "Health", "ctx_a": "[header] How to rest [title] Lie down.", "ctx_b": "",
               "endings": ["a", "b", "c", "d"], "label": "0"}
    # the extract's line 1 is preprocess(activity_label) + ": " + preprocess(ctx_a + " " + ctx_b)
    lines = ["Roof shingle removal: A man is sitting on a roof. he", "3", *original["endings"],
             "Health: How to rest. Lie down.", "0", *wikihow["endings"]]
    src = tmp_path / "hs.txt.bz2"
    src.write_bytes(bz2.compress("\n".join(lines).encode() + b"\n"))
    ours = process_docs(datasets.Dataset.from_list(_hellaswag_rows(src)))
    stock = process_docs(datasets.Dataset.from_list([original, wikihow]))
    assert ours["query"] == stock["query"] and ours["choices"] == stock["choices"]
    assert ours["query"][0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert [int(x) for x in ours["label"]] == [3, 0]


def _token_requests(seed=0, vocab=256):
    """Multiple-choice style requests: several contexts, each with 2-4 continuations of 1-6 tokens."""
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for c in range(6):
        ctx = torch.randint(3, vocab, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        for j in range(2 + c % 3):
            cont = torch.randint(3, vocab, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
            reqs.append(((f"c{c}", f"k{j}"), ctx, cont))
    return reqs


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3", "per-layer"])
def test_packed_runner_gives_lm_evals_loglikelihoods(model_and_tok, family):
    """Each context's choices in one masked sequence: lm_eval's own per-request numbers and greedy flags, with
    the context's tokens run once (Qwen3's q/k norms and a comprune per-layer model included; Gemma's sliding
    window shorter than the rows falls back to lm_eval's loop)."""
    import lm_eval.models.huggingface as hf
    from comprune.evaluate.packed import loglikelihoods
    from comprune.evaluate.zeroshot import packed_lm_class
    from conftest import tiny_model
    _, tok = model_and_tok
    if family == "per-layer":
        from comprune import PruneConfig, prune
        from conftest import calib
        model, _ = prune(tiny_model("llama", layers=4), None, PruneConfig(ratio=0.3, width_allocation="adaptive",
                                                                          batch_size=4), calibration=calib(8, 24),
                         progress=False)
        assert "intermediate_sizes" in model.config.to_dict()
    else:
        model = tiny_model(family, **({"vocab": 256} if family != "gemma3_text" else {}))
    reqs = _token_requests()
    plain = hf.HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=4)
    want = plain._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = packed_lm_class(hf.HFLM)(pretrained=model, tokenizer=tok, backend="causal",
                                   batch_size=4)._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want]
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) < 1e-4
    direct = loglikelihoods(model, [(c, k) for _, c, k in reqs], max_length=plain.max_length, progress=False)
    # the tiny Gemma's sliding window (8) is shorter than its packed rows: lm_eval's loop, not the packed path
    assert (direct is None) == (family == "gemma3_text")
    assert loglikelihoods(model, [(c, k) for _, c, k in reqs], max_length=8) is None  # truncation: lm_eval's loop


def test_packed_runner_compiled_gives_the_same_loglikelihoods(model_and_tok):
    """The zero-shot full sets run the decoder layers through torch.compile (evaluate/compiled.py): the same
    log-likelihoods and greedy flags as eager (float32, to rounding), on rows of several lengths (dynamic shapes)."""
    from comprune.evaluate.packed import loglikelihoods
    from conftest import tiny_model
    model = tiny_model("llama", vocab=256)
    reqs = [(c, k) for _, c, k in _token_requests(seed=5)]
    eager = loglikelihoods(model, reqs, max_length=64, progress=False, token_budget=64)
    fast = loglikelihoods(model, reqs, max_length=64, progress=False, token_budget=64, compile=True)
    assert [g for _, g in fast] == [g for _, g in eager]
    assert max(abs(a - b) for (a, _), (b, _) in zip(fast, eager)) < 1e-4
