"""Generation speed: greedy decoding of a fixed number of new tokens from a fixed prompt.

Every model gets the same prompt and exactly `new_tokens` new tokens (`min_new_tokens` = `max_new_tokens`, so an
early end-of-sequence never shortens a run), with the KV cache, batch 1, after a warm-up. The median of
`repeats` timed runs is reported. On a shared machine, compare models with `relative_speed`, which alternates
the two models run by run so drifting background load hits both alike.
"""
from __future__ import annotations

import statistics
import time

import torch

DEFAULT_PROMPT = ("The history of the city begins with a small settlement on the river, where farmers and traders "
                  "gathered every season to exchange grain, tools and news from the neighbouring valleys.")


def _prompt_ids(tokenizer, prompt: str, device) -> torch.Tensor:
    if tokenizer is None:  # tiny test models: bytes as token ids
        return torch.tensor([[b % 256 for b in prompt.encode("utf-8")]], device=device)
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)


@torch.inference_mode()
def _generate_once(model, ids: torch.Tensor, new_tokens: int) -> float:
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.generation_config, "eos_token_id", None)
        pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=pad)
    dt = time.perf_counter() - t0
    assert out.shape[1] - ids.shape[1] == new_tokens
    return dt


def generation_speed(model, tokenizer, prompt: str = DEFAULT_PROMPT, new_tokens: int = 64, repeats: int = 3,
                     warmup: int = 1) -> dict:
    """Greedy tokens/s of one model (median of `repeats` runs after `warmup` untimed ones)."""
    device = next(model.parameters()).device
    ids = _prompt_ids(tokenizer, prompt, device)
    model.eval()
    for _ in range(warmup):
        _generate_once(model, ids, new_tokens)
    times = [_generate_once(model, ids, new_tokens) for _ in range(repeats)]
    med = statistics.median(times)
    return {"prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens, "repeats": repeats,
            "seconds_median": round(med, 4), "tokens_per_second": round(new_tokens / med, 2),
            "threads": torch.get_num_threads()}


def relative_speed(model, reference, tokenizer, prompt: str = DEFAULT_PROMPT, new_tokens: int = 64,
                   repeats: int = 3, warmup: int = 1) -> dict:
    """tokens/s of `model` and of `reference` (e.g. the dense model), measured alternately, and their ratio."""
    device = next(model.parameters()).device
    ids = _prompt_ids(tokenizer, prompt, device)
    for m in (model, reference):
        m.eval()
        for _ in range(warmup):
            _generate_once(m, ids, new_tokens)
    tm, tr = [], []
    for _ in range(repeats):
        tm.append(_generate_once(model, ids, new_tokens))
        tr.append(_generate_once(reference, ids, new_tokens))
    m_tps = new_tokens / statistics.median(tm)
    r_tps = new_tokens / statistics.median(tr)
    return {"prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens, "repeats": repeats,
            "tokens_per_second": round(m_tps, 2), "reference_tokens_per_second": round(r_tps, 2),
            "relative": round(m_tps / r_tps, 4), "threads": torch.get_num_threads()}
