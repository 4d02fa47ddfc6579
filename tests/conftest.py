"""Tiny random models built from transformers configs: the structural test bed (no downloads)."""
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

FAMILIES = ["llama", "mistral", "qwen2"]


def tiny_config(family: str = "llama", layers: int = 6, hidden: int = 64, inter: int = 128, heads: int = 4,
                kv_heads: int = 2, vocab: int = 256):
    from transformers import AutoConfig
    kw = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=512,
              tie_word_embeddings=family != "mistral", head_dim=hidden // heads)
    if family == "mistral":
        kw["sliding_window"] = None
    cfg = AutoConfig.for_model(family, **kw)
    return cfg


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=torch.float32)
    # Random init gives near-identical blocks; spread the weights so scores and layers differ.
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
