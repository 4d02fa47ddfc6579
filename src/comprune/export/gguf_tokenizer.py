"""GGUF tokenizer metadata: a tokenizers BPE tokenizer.json as llama.cpp's `gpt2` or `llama` vocabulary."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf

from ..errors import require
from ..files import read_model_file

log = logging.getLogger(__name__)

# tokenizer.json pre-tokenizer regex -> llama.cpp `tokenizer.ggml.pre` name (plain byte-level handled below)
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_BY_REGEX = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


def bpe_pre_name(tok: dict) -> str:
    """Which llama.cpp pre-tokenizer reproduces tokenizer.json's pre-tokenizer.

    The official converter hashes the tokenization of a probe text; reading the pre-tokenizer spec covers
    the families comprune handles without a table of hashes.
    """
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    for step in steps:
        regex = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        if regex in PRE_BY_REGEX:
            return PRE_BY_REGEX[regex]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # SmolLM / StarCoder: each digit alone, then the GPT-2 regex
    log.warning("unrecognised pre-tokenizer %s: writing 'default', llama.cpp may split text differently", kinds)
    return "default"


def add_tokenizer(writer, model_dir: Path, n_vocab: int) -> None:
    """tokenizer.json BPE -> llama.cpp `gpt2` (byte-level) or `llama` (SentencePiece-style, byte fallback)."""
    data = read_model_file(model_dir, "tokenizer.json")
    require(data is not None, f"{model_dir} has no tokenizer.json: GGUF export needs a fast (tokenizers) tokenizer")
    tok = json.loads(data.decode("utf-8"))
    model = tok["model"]
    require(model.get("type") == "BPE", f"GGUF export supports BPE tokenizers, not {model.get('type')}")
    spm = bool(model.get("byte_fallback"))
    id_to_text = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    id_to_text.update({i: a["content"] for i, a in added.items()})
    require(max(id_to_text) < n_vocab, f"tokenizer has ids up to {max(id_to_text)} but the model's vocab_size "
                                       f"is {n_vocab}")
    tokens, types, scores = [], [], []
    TT = gguf.TokenType
    for i in range(n_vocab):
        text = id_to_text.get(i)
        if text is None:  # embedding rows beyond the tokenizer (vocab padded for speed)
            text, kind = f"[PAD{i}]", TT.UNUSED
        elif spm and text == model.get("unk_token"):
            kind = TT.UNKNOWN
        elif spm and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = TT.BYTE  # byte-fallback pieces
        elif i in added:
            kind = TT.CONTROL if added[i].get("special") else TT.USER_DEFINED
        else:
            kind = TT.NORMAL
        tokens.append(text)
        types.append(kind)
        # SentencePiece merges the pair whose result scores highest: BPE ids follow merge order
        scores.append(-float(i) if kind == TT.NORMAL else 0.0)
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    if spm:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        norm = json.dumps(tok.get("normalizer")) + json.dumps(tok.get("pre_tokenizer"))
        writer.add_add_space_prefix("Prepend" in norm or '"prepend_scheme": "always"' in norm)
    else:
        writer.add_tokenizer_pre(bpe_pre_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=not spm, n_vocab=n_vocab)
    if "bos" not in special.add_special_token and not spm:
        special.add_special_token["bos"] = False  # HF adds no BOS unless its config says so
    special.add_to_gguf(writer, quiet=True)
