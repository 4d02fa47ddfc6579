"""How a pruned instruct model talks: users judge it by what it says as much as by its perplexity.

Two numbers on fixed prompts (resources/chat_eval.json, none of them in any calibration source), through the
tokenizer's chat template, greedy:

- **KL(dense ‖ pruned)**: the dense model answers each open prompt greedily; both models then read prompt and
  answer, and the KL of their next-token distributions is averaged over the answer's tokens (nats per token);
- **exact-answer hits**: short questions with checkable answers (arithmetic, capitals, counts, colours, units,
  facts); a hit is an accepted answer, as whole words, in the reply's first sentence.

Every item is in a held-out half (choose settings on it) or a test half (report it). Greedy decoding is batched
with left padding, the same batches every time, so the answers are the same on every run on a machine.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CompruneError

PROMPTS = ("How many legs does a spider have?", "What is 7 plus 5?", "What is the capital of France?",
           "Name three colours of the rainbow.", "Write one sentence about the sea.")
DATA_PATH = Path(__file__).resolve().parents[1] / "resources" / "chat_eval.json"
SPLITS = ("heldout", "test")
ANSWER_TOKENS = 64    # the dense model's answers the KL is measured on
QUESTION_TOKENS = 32  # enough for a first sentence
BATCH = 8


def chat_items(split: str) -> tuple[list[str], list[dict]]:
    """(open prompts, questions with their accepted answers) of one half of the fixed set."""
    if split not in SPLITS:
        raise CompruneError(f"unknown chat split '{split}': use {' or '.join(SPLITS)}")
    data = json.loads(DATA_PATH.read_text())
    return ([p["prompt"] for p in data["prompts"] if p["split"] == split],
            [q for q in data["questions"] if q["split"] == split])


def render(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids as the model sees a user turn: its chat template, or the plain text and a newline."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt + "\n"
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _eos(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    return eos + [t for t in [tokenizer.eos_token_id] if t is not None and t not in eos]


@torch.inference_mode()
def greedy(model, tokenizer, prompts, max_new_tokens: int, batch_size: int | None = None) -> list[list[int]]:
    """Each prompt's greedy answer (token ids, up to and with the end of the turn), in batches of `batch_size`."""
    batch_size = batch_size or BATCH
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos(model, tokenizer)
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = [render(tokenizer, p) for p in prompts[start:start + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        gen = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=eos or None, temperature=None, top_p=None, top_k=None)
        for row in gen[:, width:].tolist():
            end = next((k for k, t in enumerate(row) if t in eos), None)
            out.append(row if end is None else row[:end + 1])
    return out


def chat_answers(model, tokenizer, prompts=PROMPTS, max_new_tokens: int = 40) -> list[str]:
    """The model's greedy reply to each prompt through the tokenizer's chat template (plain text without one)."""
    return [tokenizer.decode(a, skip_special_tokens=True).strip()
            for a in greedy(model, tokenizer, list(prompts), max_new_tokens)]


_WORD = re.compile(r"[a-z0-9]+(?:[-.,'][a-z0-9]+)*")


_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")


def _canonical(word: str) -> str:
    """A number as its value says it ("1,000" and "1000.00" are "1000"), any other word as it is."""
    if not _NUMBER.fullmatch(word):
        return word
    whole, _, frac = word.replace(",", "").partition(".")
    frac = frac.rstrip("0")
    return (whole.lstrip("0") or "0") + (f".{frac}" if frac else "")


def words(text: str) -> list[str]:
    return [_canonical(w) for w in _WORD.findall(text.lower())]


def first_sentence(reply: str) -> str:
    return re.split(r"[.!?](?:\s|$)|\n", reply.strip(), maxsplit=1)[0]


def is_hit(reply: str, answers) -> bool:
    """An accepted answer, as whole words, in the reply's first sentence ("The capital of France is Paris.")."""
    said = words(first_sentence(reply))
    for answer in answers:
        want = words(answer)
        if want and any(said[i:i + len(want)] == want for i in range(len(said) - len(want) + 1)):
            return True
    return False


@dataclass
class ChatReference:
    """The dense model's side of the measure on one half: its greedy answers, and the model to score them with."""
    split: str
    model: object = field(repr=False)
    prompt_ids: list = field(repr=False)
    answer_ids: list = field(repr=False)


def chat_reference(dense, tokenizer, split: str = "test", max_new_tokens: int | None = None) -> ChatReference:
    prompts, _ = chat_items(split)
    return ChatReference(split, dense, [render(tokenizer, p) for p in prompts],
                         greedy(dense, tokenizer, prompts, max_new_tokens or ANSWER_TOKENS))


@torch.inference_mode()
def answer_kl(model, reference: ChatReference) -> tuple[float, int]:
    """(KL(dense ‖ model) in nats per answer token, averaged over every token of the dense answers; tokens)."""
    total, n = 0.0, 0
    for prompt, answer in zip(reference.prompt_ids, reference.answer_ids):
        if not answer:
            continue
        logp = []
        for m in (reference.model, model):
            ids = torch.tensor([prompt + answer], device=next(m.parameters()).device)
            logits = m(ids).logits[0, len(prompt) - 1:-1].float()  # the positions that predict the answer
            logp.append(F.log_softmax(logits, -1).cpu())
        if logp[0].shape[-1] != logp[1].shape[-1]:
            raise CompruneError("the chat reference and the model have different vocabularies: compare a pruned "
                                "model with its own dense model")
        total += float((logp[0].exp() * (logp[0] - logp[1])).sum())
        n += len(answer)
    return total / max(n, 1), n


def chat_measure(model, tokenizer, reference: ChatReference | None = None, split: str = "test",
                 max_new_tokens: int | None = None) -> dict:
    """The chat measure of `model` on one half: exact-answer hits, and with a dense `reference` (of the same
    half) the KL on the dense model's answers. Returns the numbers and every reply."""
    if reference is not None and reference.split != split:
        raise CompruneError(f"the chat reference is of the {reference.split} half, not {split}")
    t0 = time.perf_counter()
    max_new_tokens = max_new_tokens or QUESTION_TOKENS
    _, questions = chat_items(split)
    replies = [tokenizer.decode(a, skip_special_tokens=True).strip()
               for a in greedy(model, tokenizer, [q["question"] for q in questions], max_new_tokens)]
    hits = [is_hit(r, q["answers"]) for r, q in zip(replies, questions)]
    res = {"split": split, "hits": sum(hits), "questions": len(questions), "hit_rate": sum(hits) / len(questions),
           "question_tokens": max_new_tokens,
           "replies": [{"question": q["question"], "reply": r, "hit": h} for q, r, h in zip(questions, replies, hits)]}
    if reference is not None:
        res["kl"], res["kl_tokens"] = answer_kl(model, reference)
        res["kl_prompts"] = len(reference.answer_ids)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res
