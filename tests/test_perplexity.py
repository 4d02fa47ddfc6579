import math

import pytest
import torch

from comprune.data import sample_windows, load_rows, resolve_data_dir, tokenize_stream
from comprune.errors import CompruneError
from comprune.evaluate.perplexity import perplexity, token_windows
from conftest import tiny_model


def direct_ppl(model, windows):
    losses = []
    with torch.no_grad():
        for w in windows:
            losses.append(model(input_ids=w[None], labels=w[None]).loss.item())
    return math.exp(sum(losses) / len(losses))


@pytest.mark.parametrize("seqlen", [16, 64])
def test_perplexity_matches_direct_loop(seqlen):
    model = tiny_model("llama")
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (1000,))
    r = perplexity(model, None, ids=ids, seqlen=seqlen, batch_size=3, progress=False)
    expect = direct_ppl(model, token_windows(ids, seqlen))
    assert r["windows"] == 1000 // seqlen
    assert r["ppl"] == pytest.approx(expect, rel=1e-5)


def test_gemma_windows_start_with_bos():
    """Gemma is evaluated (and calibrated) with <bos> first: windows of <bos> + seqlen-1 text tokens, every
    text token scored, the same number as a BOS-less family scores one window later."""
    model = tiny_model("gemma3_text")
    bos = model.config.bos_token_id
    assert bos is not None
    ids = torch.randint(3, 256, (1000,), generator=torch.Generator().manual_seed(4))
    r = perplexity(model, None, ids=ids, seqlen=32, progress=False)
    windows = token_windows(ids, 32, bos=bos)
    assert r["bos"] and windows.shape == (1000 // 31, 32) and (windows[:, 0] == bos).all()
    assert torch.equal(windows[1, 1:], ids[31:62])
    assert r["scored_tokens"] == windows.shape[0] * 31
    assert r["ppl"] == pytest.approx(direct_ppl(model, windows), rel=1e-5)
    assert not perplexity(tiny_model("llama"), None, ids=ids, seqlen=32, progress=False)["bos"]


def test_max_tokens_slices_the_stream():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(2))
    r = perplexity(model, None, ids=ids, seqlen=32, max_tokens=300, progress=False)
    assert r["windows"] == 9 and r["tokens"] == 288
    assert r["ppl"] == pytest.approx(direct_ppl(model, ids[:288].view(9, 32)), rel=1e-5)


def test_head_chunking_is_exact():
    import importlib
    P = importlib.import_module("comprune.evaluate.perplexity")
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (640,), generator=torch.Generator().manual_seed(3))
    a = perplexity(model, None, ids=ids, seqlen=64, progress=False)["ppl"]
    old, P.HEAD_CHUNK = P.HEAD_CHUNK, 7
    try:
        b = perplexity(model, None, ids=ids, seqlen=64, progress=False)["ppl"]
    finally:
        P.HEAD_CHUNK = old
    assert a == pytest.approx(b, rel=1e-6)


def test_calibration_sampler_is_deterministic():
    ids = torch.arange(10_000)
    a = sample_windows(ids, 8, 128, seed=5)
    b = sample_windows(ids, 8, 128, seed=5)
    c = sample_windows(ids, 8, 128, seed=6)
    assert a.shape == (8, 128) and torch.equal(a, b) and not torch.equal(a, c)
    # windows are contiguous slices of the stream
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 127, dtype=a.dtype))


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(CompruneError, match="seqlen"):
        token_windows(torch.arange(100), 1)
    with pytest.raises(CompruneError, match="fewer than seqlen"):
        sample_windows(torch.arange(50), 4, 128, 0)
    with pytest.raises(CompruneError, match="unknown dataset"):
        load_rows("nonesuch")
    with pytest.raises(CompruneError, match="not found"):
        resolve_data_dir(tmp_path / "missing")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(CompruneError, match="not JSON"):
        load_rows(str(bad))


def test_shared_wikitext_is_found():
    rows = load_rows("wikitext2")
    assert len(rows) == 4358 and rows[1] == " = Robert Boulter = \n"


@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_tokenizing_in_pieces_equals_tokenizing_the_whole_text(source):
    """load_ids cuts the corpus into pieces to bound memory; a byte-level BPE (SmolLM2's kind) must give the
    very same ids as one call on the joined text, including around WikiText's empty rows and headings."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from comprune.data import JOIN, tokenize_rows
    rows = load_rows(source)[:3000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(rows[:300], trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    whole = tokenize_stream(tok, JOIN.join(rows))
    for chunk_chars in (2000, 50_000):
        assert torch.equal(tokenize_rows(tok, rows, chunk_chars), whole)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_compiled_perplexity_matches_eager(family):
    """torch.compile'd layers and head cross-entropy (evaluate/compiled.py) give the eager perplexity (float32:
    up to float rounding), report that they ran, and leave the model uncompiled afterwards."""
    from comprune.evaluate.compiled import _decoder_layers
    model = tiny_model(family)
    ids = torch.randint(3, 256, (600,), generator=torch.Generator().manual_seed(2))
    eager = perplexity(model, None, ids=ids, seqlen=32, batch_size=4, progress=False)
    fast = perplexity(model, None, ids=ids, seqlen=32, batch_size=4, progress=False, compile=True)
    assert not eager["compiled"] and fast["compiled"]
    assert fast["ppl"] == pytest.approx(eager["ppl"], rel=1e-4)
    assert fast["steady_tokens_per_second"] > 0 and fast["first_batch_seconds"] > 0
    assert all(layer._compiled_call_impl is None for layer in _decoder_layers(model))


def test_compile_failure_falls_back_to_eager(monkeypatch):
    """Where inductor cannot compile (no C++ compiler, say), the evaluation warns and runs eager, same numbers."""
    import torch.nn as nn

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(3))
    eager = perplexity(model, None, ids=ids, seqlen=32, progress=False)

    def broken(self, *a, **k):
        self._compiled_call_impl = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no compiler here"))
    monkeypatch.setattr(nn.Module, "compile", broken)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*no compiler here"):
        r = perplexity(model, None, ids=ids, seqlen=32, progress=False, compile=True)
    assert r["ppl"] == pytest.approx(eager["ppl"], rel=1e-6) and not r["compiled"]


def test_compile_auto_compiles_long_evaluations_only():
    from comprune.evaluate import compiled
    assert compiled.resolve("auto", compiled.AUTO_MIN_TOKENS) and not compiled.resolve("auto", 16384)
    assert compiled.resolve("auto", None)  # open-ended: the zero-shot tasks' full sets
    assert compiled.resolve("on", 1) and not compiled.resolve("off", 10**9)
    with pytest.raises(CompruneError, match="auto, on or off"):
        compiled.resolve("sometimes", 1)
