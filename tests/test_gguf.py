"""GGUF export: tiny random models exported to GGUF must give transformers' next-token distribution in llama.cpp."""
import importlib.util
import json

import pytest
import torch

from comprune.errors import CompruneError
from comprune.export.gguf import export_gguf
from comprune.export.llamacpp import llamacpp_server, next_token_logprobs
from conftest import randomize, tiny_model

VOCAB = 300
# Max |log p_llama.cpp - log p_transformers| over the whole vocab (logit std ~1 on these models).
# f16: weights and llama.cpp's f16 KV cache round to f16; measured 1e-3..3e-3. q8_0 also quantizes activations.
# f32 runs llama.cpp with an f32 KV cache and no flash attention: measured ~1.5e-6.
TOL = {"f16": 0.02, "q8_0": 0.15, "f32": 1e-4}

needs_llamacpp = pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None,
                                    reason="xllamacpp (llama.cpp runtime) not installed: pip install xllamacpp")

TEXT = ("The quick brown fox jumps over the lazy dog. Pruned models keep the layers that matter; "
        "llama.cpp runs them on a laptop. 0123456789 (numbers), punctuation! and\nnew lines.\n") * 20


def save_tokenizer(path, kind="bpe"):
    """A small tokenizer trained here (no download): GPT-2 style byte-level BPE, or a Llama-2 style
    SentencePiece BPE with byte fallback ("spm")."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB - 20, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([TEXT], trainer)
        config = {"bos_token": "<s>", "eos_token": "</s>"}
    else:
        # Train word pieces, then lay the vocab out as Llama 2 does: <unk> <s> </s>, 256 byte pieces, pieces.
        trainer = trainers.BpeTrainer(vocab_size=VOCAB - 256, special_tokens=["<unk>", "<s>", "</s>"])
        draft = Tokenizer(models.BPE(unk_token="<unk>"))
        draft.pre_tokenizer = pre_tokenizers.Metaspace()
        draft.train_from_iterator([TEXT], trainer)
        trained = json.loads(draft.to_str())["model"]
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
        for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1])[:VOCAB - len(vocab)]:
            vocab.setdefault(piece, len(vocab))
        merges = [tuple(m) for m in trained["merges"] if m[0] in vocab and m[1] in vocab and "".join(m) in vocab]
        tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        tok.add_special_tokens(["<unk>", "<s>", "</s>"])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def nonuniform_llama(widths):
    from comprune.models.modeling_comprune import CompruneLlamaConfig, CompruneLlamaForCausalLM
    base = tiny_model("llama", layers=len(widths), vocab=VOCAB).config.to_dict()
    base.pop("model_type", None)
    return randomize(CompruneLlamaForCausalLM(CompruneLlamaConfig(**base, intermediate_sizes=widths)), seed=0)


def save(model, path, tokenizer="bpe"):
    model.save_pretrained(path)
    save_tokenizer(path, tokenizer)
    return path


def plain_token(src):
    """An ASCII token id, for next_token_logprobs(force=...)."""
    vocab = json.loads((src / "tokenizer.json").read_text())["model"]["vocab"]
    return vocab.get("a", vocab.get("\u2581a"))


def max_logprob_diff(model, src, gguf_path, prompts, exact=False):
    """Max |log p_llama.cpp - log p_transformers| over the whole vocab, at the end of each prompt."""
    plain = plain_token(src)
    server = llamacpp_server(gguf_path, n_ctx=128, exact=exact)
    worst = 0.0
    for ids in prompts:
        got = next_token_logprobs(server, ids, n_probs=VOCAB, force=plain)
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
        assert len(got) == VOCAB
        worst = max(worst, max(abs(ref[i].item() - lp) for i, lp in got.items()))
    del server
    return worst


def prompts(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (length,), generator=g).tolist() for length in (1, 9, 40)[:n]]


@pytest.mark.slow
@needs_llamacpp
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_uniform_llama_matches_transformers(tmp_path, qtype):
    model = tiny_model("llama", vocab=VOCAB)
    src = save(model, tmp_path / "m")
    info = export_gguf(src, tmp_path / "m.gguf", qtype)
    assert info["arch"] == "llama" and info["ffn_widths"] == [128] * 6 and info["bytes"] > 0
    diff = max_logprob_diff(model, src, info["path"], prompts())
    print(f"uniform llama {qtype}: max |dlogprob| = {diff:.2e}")
    assert diff < TOL[qtype]


@pytest.mark.slow
@needs_llamacpp
@pytest.mark.parametrize("qtype", ["f16", "f32", "q8_0"])
def test_nonuniform_deci_matches_transformers(tmp_path, qtype):
    widths = [128, 40, 0, 96, 7, 0]  # narrower, odd and removed MLPs, including the last layer's
    model = nonuniform_llama(widths)
    src = save(model, tmp_path / "m")
    assert json.loads((src / "config.json").read_text())["model_type"] == "comprune_llama"
    info = export_gguf(src, tmp_path / "m.gguf", qtype)
    assert info["arch"] == "deci" and info["ffn_widths"] == widths
    # zero neurons pad every width to a multiple of 32 (the kernels' speed) and a removed MLP to width 1 (q8_0:
    # a block of 32), output unchanged; pad_to=1 writes the exact widths (q8_0 still needs its blocks)
    assert info["gguf_ffn_widths"] == [128, 64, 32 if qtype == "q8_0" else 1, 96, 32, 32 if qtype == "q8_0" else 1]
    diff = max_logprob_diff(model, src, info["path"], prompts(), exact=qtype == "f32")
    print(f"non-uniform deci {qtype}: max |dlogprob| = {diff:.2e}")
    assert diff < TOL[qtype]
    exact = export_gguf(src, tmp_path / "e.gguf", qtype, pad_to=1)
    assert exact["gguf_ffn_widths"] == ([128, 64, 32, 96, 32, 32] if qtype == "q8_0" else [128, 40, 1, 96, 7, 1])
    if qtype != "q8_0":
        assert exact["bytes"] < info["bytes"]
        assert max_logprob_diff(model, src, exact["path"], prompts(), exact=qtype == "f32") < TOL[qtype]


@needs_llamacpp
def test_per_layer_heads_deci_matches_transformers(tmp_path):
    """Reliability audit item 8: GQA groups pruned unevenly (per-layer query/KV head counts) plus uneven MLPs,
    saved by comprune (base model_type + auto_map), export to llama.cpp's deci arch, which loads it and gives
    transformers' next-token log-probs within the f32 tolerance."""
    from comprune import save_pretrained
    from comprune.models import get_adapter
    from comprune.surgery import finalize_config, prune_heads, prune_mlp
    model = tiny_model("llama", layers=4, heads=4, kv_heads=2, vocab=VOCAB)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    prune_heads(adapter, layers[1], torch.tensor([1]))  # 2 of 4 query heads, 1 of 2 KV heads
    prune_heads(adapter, layers[3], torch.tensor([0]))
    prune_mlp(adapter, layers[2], torch.arange(0, 128, 3))
    finalize_config(model, adapter)
    src = tmp_path / "m"
    save_pretrained(model, None, src)
    save_tokenizer(src)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads_per_layer"] == [2, 1, 2, 1]
    info = export_gguf(src, tmp_path / "m.gguf", "f32")
    assert info["arch"] == "deci"
    diff = max_logprob_diff(model, src, info["path"], prompts(), exact=True)
    print(f"per-layer heads deci f32: max |dlogprob| = {diff:.2e}")
    assert diff < TOL["f32"]


@pytest.mark.slow
@needs_llamacpp
def test_qwen2_matches_transformers(tmp_path):
    """Qwen2 keeps llama.cpp's qwen2 arch (attention biases, no Q/K permutation)."""
    model = tiny_model("qwen2", vocab=VOCAB)
    src = save(model, tmp_path / "m")
    info = export_gguf(src, tmp_path / "m.gguf", "f32")
    assert info["arch"] == "qwen2"
    diff = max_logprob_diff(model, src, info["path"], prompts(2), exact=True)
    print(f"uniform qwen2 f32: max |dlogprob| = {diff:.2e}")
    assert diff < TOL["f32"]


@pytest.mark.slow
@needs_llamacpp
def test_llama3_rope_scaling_matches_transformers(tmp_path):
    """Llama 3.x rope scaling travels as llama.cpp's rope_freqs tensor."""
    from transformers import AutoModelForCausalLM
    from conftest import tiny_config
    cfg = tiny_config("llama", vocab=VOCAB)
    cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = randomize(AutoModelForCausalLM.from_config(cfg), seed=0)
    src = save(model, tmp_path / "m")
    info = export_gguf(src, tmp_path / "m.gguf", "f32")
    assert max_logprob_diff(model, src, info["path"], prompts(), exact=True) < TOL["f32"]


@pytest.mark.slow
@needs_llamacpp
@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_llamacpp_tokenizes_like_transformers(tmp_path, kind):
    """Text tokenized by llama.cpp from the GGUF metadata gives the same next-token distribution as the
    ids transformers' tokenizer makes (so the token lists, merges/scores, pre-tokenizer and BOS agree)."""
    from transformers import PreTrainedTokenizerFast
    src = save(tiny_model("llama", vocab=VOCAB), tmp_path / "m", kind)
    info = export_gguf(src, tmp_path / "m.gguf", "f16")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
    server = llamacpp_server(info["path"], n_ctx=256)
    for text in ["The quick brown fox jumps over the lazy dog.", "Pruned models: 0123456789 (numbers)\nnew lines!"]:
        ids = hf(text).input_ids
        assert (ids[0] == 1) == (kind == "spm")  # Llama-2 style adds <s>
        by_ids = next_token_logprobs(server, ids, VOCAB, force=plain_token(src))
        by_text = next_token_logprobs(server, text, VOCAB, force=plain_token(src))
        assert max(abs(by_ids[i] - by_text[i]) for i in by_ids) < 1e-4, f"{kind} tokenization differs: {text!r}"
    del server


def test_export_errors(tmp_path):
    with pytest.raises(CompruneError, match="not found"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CompruneError, match="model_type 'gpt2'"):
        export_gguf(tmp_path / "gpt2", tmp_path / "x.gguf")
    src = save(tiny_model("llama", vocab=VOCAB), tmp_path / "m")
    with pytest.raises(CompruneError, match="unknown GGUF type"):
        export_gguf(src, tmp_path / "x.gguf", "q4_k")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "f32"])
def test_gguf_size_is_exact_without_writing(tmp_path, qtype):
    """export.size.gguf_bytes (no tensor written) equals the size of the file the export writes, uniform and
    non-uniform (odd and removed widths, q8_0 padding and f16 fallback rows)."""
    from comprune.export.size import gguf_bytes
    for name, model in (("u", tiny_model("llama", vocab=VOCAB)), ("n", nonuniform_llama([128, 40, 0, 96, 7, 0]))):
        src = save(model, tmp_path / name)
        assert gguf_bytes(src, qtype) == export_gguf(src, tmp_path / f"{name}.gguf", qtype)["bytes"]


def prune_to_size(src, out, target: int, qtype: str) -> dict:
    """`comprune prune --target-size` in its own process; the target's record from its --json output."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "comprune.cli", "prune", str(src), "--out", str(out), "--target-size",
                        str(target), "--target-type", qtype, "--nsamples", "8", "--seqlen", "32", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)["target_size"]


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_prune_to_target_size(tmp_path, qtype):
    """--target-size: the pruned model's GGUF is at most the target and within a few width quanta of it; the
    real size is recorded in pruning.json."""
    import subprocess
    import sys
    from comprune.export.size import gguf_bytes
    model = tiny_model("llama", vocab=VOCAB, layers=4, inter=1024)
    src = save(model, tmp_path / "m")
    dense = gguf_bytes(src, qtype)
    target = int(dense * 0.8)
    out = tmp_path / "p"
    rec = prune_to_size(src, out, target, qtype)
    got = export_gguf(out, tmp_path / "p.gguf", qtype)["bytes"]
    assert rec["gguf_bytes"] == got <= target and rec["met"]
    hidden = model.config.hidden_size
    quantum = 3 * hidden * 32 * (2 if qtype == "f16" else 34 / 32)  # widths in the export's multiples of 32
    assert target - got < 3 * 4 * quantum  # under the target by little more than the margin
    assert json.loads((out / "pruning.json").read_text())["target_size"]["gguf_bytes"] == got
    r = subprocess.run([sys.executable, "-m", "comprune.cli", "prune", str(src), "--out", str(tmp_path / "q"),
                        "--target-size", str(dense + 1), "--target-type", qtype], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "already within" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_latency_fit_and_speedup_ratio():
    """The latency model: exact coefficients from exact points, never negative from noisy ones; the ratio
    found for a target speedup is the smallest whose plan is predicted to reach it."""
    from comprune.config import PruneConfig
    from comprune.budget import plan_speedup, ratio_for_speedup
    from comprune.export.latency import fit
    from comprune.models.adapters import get_adapter
    c, a, m = 0.2, 0.3, 0.5
    pts = [(l, n, c + a * l + m * n) for l, n in ((1, 0.5), (1, 0.25), (0.5, 0.5))]
    got = fit(pts)
    assert all(abs(got[k] - v) < 1e-9 for k, v in (("c", c), ("a", a), ("m", m)))
    noisy = fit([(1, 0.5, 1.02), (1, 0.25, 1.01), (0.5, 0.5, 0.99)])  # slower when pruned: noise only
    assert min(noisy.values()) >= 0 and abs(sum(noisy.values()) - 1) < 1e-9
    model = tiny_model("llama", vocab=VOCAB, layers=8, inter=512)
    adapter = get_adapter(model)
    table = {"c": c, "a": a, "m": m, "qtype": "f16", "threads": 2, "cpu": "x", "points": pts}
    cfg = PruneConfig(ratio=0.2).validate()
    res = ratio_for_speedup(model, adapter, cfg, table, 1.25)
    assert res["predicted"] >= 1.25 and cfg.ratio == 0.2  # cfg untouched
    assert plan_speedup(model, adapter, cfg, table, ratio=res["ratio"] - 1e-3) < 1.25
    with pytest.raises(CompruneError, match="beyond"):
        ratio_for_speedup(model, adapter, PruneConfig().validate(), table, 50.0)


@needs_llamacpp
def test_prune_to_target_speedup_measures_a_table_once(tmp_path):
    """--target-speedup times sliced variants in llama.cpp once (cached), and records the plan's prediction."""
    import os
    import subprocess
    import sys
    src = save(tiny_model("llama", vocab=VOCAB, layers=4, inter=1024), tmp_path / "m")
    env = {**os.environ, "COMPRUNE_CACHE": str(tmp_path / "cache")}
    run = lambda out: subprocess.run([sys.executable, "-m", "comprune.cli", "prune", str(src), "--out", str(out),  # noqa: E731
                                      "--target-speedup", "1.2", "--layer-share", "0.5", "--nsamples", "8",
                                      "--seqlen", "32", "--json"], capture_output=True, text=True, timeout=300, env=env)
    r = run(tmp_path / "p")
    tables = list((tmp_path / "cache" / "latency").glob("*.json"))
    assert len(tables) == 1, r.stderr[-2000:]
    table = json.loads(tables[0].read_text())
    assert len(table["points"]) == 5 and min(table[k] for k in "cam") >= 0
    if r.returncode == 0:
        rec = json.loads(r.stdout)["target_speedup"]
        assert rec["predicted"] >= 1.2 and rec["table"]["points"] == table["points"]
        # the widths are the export's (multiples of 32, no padded zeros), and the prediction is made at them
        cfg = json.loads((tmp_path / "p" / "config.json").read_text())
        widths = cfg.get("intermediate_sizes") or [cfg["intermediate_size"]] * cfg["num_hidden_layers"]
        assert all(w % 32 == 0 for w in widths), widths
        from comprune.budget import predicted_speedup
        assert rec["predicted"] == pytest.approx(predicted_speedup(table, len(widths) / 4, sum(widths) / (4 * 1024)))
    else:  # a loaded machine can time the tiny model's variants no faster than dense: then a clear refusal
        assert "beyond what this model's plans reach" in r.stderr and not (tmp_path / "p").exists(), r.stderr[-2000:]
    stamp = tables[0].stat().st_mtime_ns
    again = run(tmp_path / "q")
    assert again.returncode == r.returncode and tables[0].stat().st_mtime_ns == stamp  # not measured again
    # with --ratio, the speedup is a constraint of the width search (the cached table again), or a clear refusal
    base = [sys.executable, "-m", "comprune.cli", "prune", str(src), "--ratio", "0.3", "--target-speedup", "1.05",
            "--nsamples", "8", "--seqlen", "32", "--json"]
    plain = subprocess.run([*base, "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300, env=env)
    assert plain.returncode != 0 and "add --preset comp-search" in plain.stderr
    both = subprocess.run([*base, "--preset", "comp-search", "--search-generations", "2", "--search-nsamples", "4",
                           "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=300, env=env)
    assert tables[0].stat().st_mtime_ns == stamp
    if both.returncode == 0:
        out = json.loads(both.stdout)
        rec = out["target_speedup"]
        # the speedup's widths are multiples of 32: the ratio within half that step (large on a tiny model)
        half_step = out["budget"]["quantum_params"] / 2 / (out["budget"]["params_to_remove"] / 0.3)
        assert rec["with_ratio"] and rec["predicted"] >= 1.05
        assert abs(out["ratio_achieved"] - 0.3) <= max(0.005, half_step * 1.01), (out["ratio_achieved"], half_step)
        assert len(out["removed_layers"]) >= rec["min_removed_blocks"]
    else:
        assert "beyond this ratio's reach" in both.stderr and not (tmp_path / "s").exists(), both.stderr[-2000:]
