"""Tiny random models built from transformers configs: the structural test bed (no downloads)."""
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

FAMILIES = ["llama", "mistral", "qwen2"]
# Families beyond the Llama layout (tests/test_families.py), each configured to exercise what sets it apart.
OTHER_FAMILIES = ["gemma3_text", "gemma2", "qwen3", "phi3", "opt", "olmo2", "granite", "smollm3"]
SPECIAL_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the defaults of some lie outside vocab 256
FAMILY_KW = {
    # head_dim != hidden / heads; sliding windows shorter than the test sequences; softcapping; a query scale that
    # is not head_dim; a sliding/global pattern that removed blocks must keep in step
    "gemma3_text": dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=8, sliding_window_pattern=3,
                        final_logit_softcapping=30.0, **SPECIAL_TOKENS),
    "gemma2": dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, **SPECIAL_TOKENS),
    "qwen3": dict(head_dim=32),
    "phi3": dict(head_dim=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.5}, **SPECIAL_TOKENS),
    "olmo2": dict(**SPECIAL_TOKENS),
    "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1,
                    logits_scaling=4.0),
    "smollm3": dict(no_rope_layer_interval=4, **SPECIAL_TOKENS),
}


def tiny_config(family: str = "llama", layers: int = 6, hidden: int = 64, inter: int = 128, heads: int = 4,
                kv_heads: int = 2, vocab: int = 256, head_dim: int | None = None):
    from transformers import AutoConfig
    kw = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=512,
              tie_word_embeddings=family != "mistral", head_dim=hidden // heads)
    if family == "mistral":
        kw["sliding_window"] = None
    if family == "opt":  # fc1/fc2 with biases, LayerNorms, learned positions, multi-head attention only
        kw = dict(hidden_size=hidden, ffn_dim=inter, num_hidden_layers=layers, num_attention_heads=heads,
                  vocab_size=vocab, max_position_embeddings=512, word_embed_proj_dim=hidden, **SPECIAL_TOKENS)
    kw.update(FAMILY_KW.get(family, {}))
    if head_dim is not None and family not in ("phi3", "opt"):  # those two derive it from hidden / heads
        kw["head_dim"] = head_dim
    if kw.get("head_dim", 0) is None:
        del kw["head_dim"]
    cfg = AutoConfig.for_model(family, **kw)
    return cfg


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=torch.float32)
    return randomize(model)


def randomize(model, seed=None):
    """Random init gives near-identical blocks; spread the weights so scores and layers differ."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


class ByteTokenizer:
    """A stand-in tokenizer for tiny models: bytes mod vocab, enough for perplexity and calibration."""
    pad_token = eos_token = "\0"
    pad_token_id = eos_token_id = 0

    def __init__(self, vocab=256):
        self.vocab = vocab

    def __call__(self, text, return_tensors=None, add_special_tokens=False, verbose=False):
        ids = torch.tensor([[b % self.vocab for b in text.encode("utf-8")]])

        class Out:
            input_ids = ids
        return Out()


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizer()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


# ---- shared pruning-test helpers (test_comp, test_baselines)
def calib(n=16, t=32, seed=0, vocab=256):
    """Random calibration windows for tiny models."""
    from comprune import Calibration
    return Calibration(torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed)), "random", seed)


def masked_dense_logits(dense, report, ids, pruned=None):
    """Logits of the dense model with everything a pruning report says was cut masked instead: removed blocks
    skipped, pruned MLP neurons zeroed (kept ones scaled by "scales" if any), query heads of removed KV groups
    zeroed at the o_proj input, and, when `pruned` is given, the pruned model's extra o_proj/down_proj biases
    (FLAP's compensation) added to the dense outputs."""
    from comprune.models import get_adapter
    from comprune.surgery import attention_parts, kv_group_channels
    adapter = get_adapter(dense)
    for m in (dense, pruned):  # fused families (Phi-3): their parts, as the pruner saw them; fused again below
        if m is not None:
            adapter.prepare(m)
    pruned_layers = adapter.layers(pruned) if pruned is not None else None
    handles = []

    def add_hook(module, fn, pre=False):
        handles.append(module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))

    for i, layer in enumerate(adapter.layers(dense)):
        if i in report.removed_layers:
            handles.append(layer.register_forward_hook(lambda m, args, kwargs, out: args[0] if args else
                                                       kwargs["hidden_states"], with_kwargs=True))
            continue
        rec = report.blocks[i]
        down = adapter.mlp(layer).down
        mask = torch.zeros(down.in_features)
        keep = torch.tensor(rec["kept_neurons"], dtype=torch.long)
        mask[keep] = torch.tensor(rec["scales"], dtype=torch.float32) if "scales" in rec else 1.0
        refit = pruned_layers is not None and "rel_error_tuned" in rec and "scales" not in rec
        if refit:  # least-squares recovery: the kept columns carry the pruned model's refitted weights
            p_down = adapter.mlp(pruned_layers[report.kept_layers.index(i)]).down.weight.detach()
            add_hook(down, lambda m, args, out, keep=keep, w=p_down: args[0][..., keep] @ w.T)
        else:
            add_hook(down, lambda m, args, mask=mask: (args[0] * mask,), pre=True)
        parts = attention_parts(adapter, layer)
        if "kept_kv_heads" in rec and len(rec["kept_kv_heads"]) < parts.n_kv:
            removed = torch.tensor([g for g in range(parts.n_kv) if g not in rec["kept_kv_heads"]])
            qo, _ = kv_group_channels(parts, removed)
            hmask = torch.ones(parts.o.in_features)
            hmask[qo] = 0
            if "head_scales" in rec:  # COMP's per-query-head scales of the kept groups
                kept_qo, _ = kv_group_channels(parts, torch.tensor(rec["kept_kv_heads"]))
                hmask[kept_qo] = torch.tensor(rec["head_scales"]).float().repeat_interleave(parts.head_dim)
            if "head_scales" in rec or pruned_layers is None or "head_rel_error_tuned" not in rec:  # not refitted
                add_hook(parts.o, lambda m, args, hmask=hmask: (args[0] * hmask,), pre=True)
            else:  # least-squares recovery: the kept groups' o_proj columns carry the refitted weights
                pp = attention_parts(adapter, pruned_layers[report.kept_layers.index(i)])
                ch, _ = kv_group_channels(parts, torch.tensor(rec["kept_kv_heads"]))
                add_hook(parts.o, lambda m, args, out, ch=ch, w=pp.o.weight.detach(): args[0][..., ch] @ w.T)
        if pruned_layers is not None and "kept_query_heads" in rec:
            pp = attention_parts(adapter, pruned_layers[report.kept_layers.index(i)])
            ch = torch.tensor([h * parts.head_dim + c for h in rec["kept_query_heads"] for c in range(parts.head_dim)])
            add_hook(parts.o, lambda m, args, out, ch=ch, w=pp.o.weight.detach(): args[0][..., ch] @ w.T)
        if pruned_layers is not None and not refit:
            p = pruned_layers[report.kept_layers.index(i)]
            pp = attention_parts(adapter, p)
            for dl, pl in ((parts.o, pp.o), (down, adapter.mlp(p).down)):
                if pl.bias is not None:
                    extra = pl.bias.detach() - (dl.bias.detach() if dl.bias is not None else 0)
                    add_hook(dl, lambda m, args, out, extra=extra: out + extra)
    try:
        with torch.no_grad():
            return dense(ids).logits
    finally:
        for h in handles:
            h.remove()
        for m in (dense, pruned):
            if m is not None:
                adapter.restore(m)


def greedy_matches_uncached(model, ids, steps=4):
    """Cached greedy decoding (KV cache, renumbered/narrowed layers) equals uncached argmax steps."""
    out = model.generate(ids, max_new_tokens=steps, do_sample=False)
    seq = ids
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return torch.equal(out, seq)


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_bpe_tokenizer(chat: bool = True):
    """A real (fast) tokenizer for tiny models: one token per byte (ids 0..255), then <|im_start|> = 256 and
    <|im_end|> = 257 (the end of a turn and eos); with `chat`, a ChatML template. Use tiny_model(vocab=260)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from test_zeroshot import _bytes_to_unicode
    b2u = _bytes_to_unicode()
    tk = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=b2u[0])
    tok.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok
