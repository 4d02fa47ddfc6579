"""Log-likelihoods of continuations with each shared context run once (lm_eval's loglikelihood requests).

A multiple-choice task asks for log p(choice_j | context) for every choice of one context; lm_eval's HFLM runs
context + choice once per choice. Here a context and all its continuations are one sequence,
[context, cont_1[:-1], cont_2[:-1], ...], whose attention mask lets each continuation see the context and its
own earlier tokens only, with its positions continuing the context's: the numbers separate runs give (up to
float rounding), for the context's tokens once. The head runs only at the scored positions.

Where a custom mask cannot be trusted (sliding-window attention shorter than a packed row, a model without
transformers' mask handling, lm_eval's left truncation), `loglikelihoods` returns None and the caller falls back
to lm_eval's own loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .compiled import Compiled
from .perplexity import family_logits


def group_by_context(requests: list[tuple[list[int], list[int]]]) -> list[tuple[tuple, list[int]]]:
    """(context tokens, indices of its requests) in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, (ctx, _) in enumerate(requests):
        groups.setdefault(tuple(ctx), []).append(i)
    return list(groups.items())


def pack(context: tuple, conts: list[list[int]]):
    """One packed row: tokens, positions, segment of each token (-1: context), and per continuation the row
    positions whose logits score its tokens."""
    tokens, positions, segments = list(context), list(range(len(context))), [-1] * len(context)
    scored = []
    for j, cont in enumerate(conts):
        rows = [len(context) - 1]  # the context's last token predicts every continuation's first
        for t, tok in enumerate(cont[:-1]):
            rows.append(len(tokens))
            tokens.append(tok)
            positions.append(len(context) + t)
            segments.append(j)
        scored.append(rows)
    return tokens, positions, segments, scored


def block_mask(segments: list[list[int]], length: int, dtype) -> torch.Tensor:
    """Additive mask [B, 1, L, L]: causal, and a continuation sees the context and its own segment only. Padding
    (segment -2) sees itself, so no row is empty."""
    seg = torch.full((len(segments), length), -2, dtype=torch.long)
    for b, s in enumerate(segments):
        seg[b, :len(s)] = torch.tensor(s, dtype=torch.long)
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & ((k == -1) | (k == q)) & (q != -2) & (k != -2)
    allowed |= torch.eye(length, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _supported(model, longest: int, max_length: int) -> bool:
    if not hasattr(model, "base_model") or model.get_output_embeddings() is None:
        return False
    window = getattr(model.config, "sliding_window", None)
    return longest <= max_length and not (window and longest > int(window))


@torch.inference_mode()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], max_length: int, token_budget: int = 4096,
                   progress: bool = True, compile: bool = False) -> list[tuple[float, bool]] | None:
    """(log p(continuation | context), whether greedy decoding gives it) per (context, continuation) request;
    None where packing does not apply (see the module docstring). `compile`: the decoder layers run through
    torch.compile (evaluate/compiled.py)."""
    if any(len(c) == 0 or len(k) == 0 or len(c) + len(k) > max_length + 1 for c, k in requests):
        return None
    rows = []
    for ctx, idx in group_by_context(requests):
        tokens, positions, segments, scored = pack(ctx, [requests[i][1] for i in idx])
        rows.append((tokens, positions, segments, scored, idx))
    if not _supported(model, max(len(r[0]) for r in rows), max_length):
        return None
    rows.sort(key=lambda r: -len(r[0]))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    base, head, logit_fn = model.base_model, model.get_output_embeddings(), family_logits(model)
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="loglikelihood (packed)", disable=not progress, dynamic_ncols=True)
    with Compiled(model, compile) as fast:
        start = 0
        while start < len(rows):
            length = len(rows[start][0])
            n = max(1, min(len(rows) - start, token_budget // max(length, 1)))
            batch = rows[start:start + n]
            start += n
            ids = torch.zeros(n, length, dtype=torch.long)
            pos = torch.zeros(n, length, dtype=torch.long)
            for b, (tokens, positions, *_rest) in enumerate(batch):
                ids[b, :len(tokens)] = torch.tensor(tokens)
                pos[b, :len(positions)] = torch.tensor(positions)
            mask = block_mask([r[2] for r in batch], length, dtype)
            hidden = fast.run(lambda: base(input_ids=ids.to(device), attention_mask=mask.to(device),
                                           position_ids=pos.to(device), use_cache=False).last_hidden_state)
            for b, (_, _, _, scored, idx) in enumerate(batch):
                for rows_j, i in zip(scored, idx):
                    logits = head(hidden[b, rows_j]).float()
                    if logit_fn is not None:
                        logits = logit_fn(logits)
                    logp = F.log_softmax(logits, dim=-1)
                    target = torch.tensor(requests[i][1], device=logp.device)
                    out[i] = (float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
                    bar.update(1)
    bar.close()
    return out
