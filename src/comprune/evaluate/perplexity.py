"""WikiText-2 style perplexity with the field's protocol: join rows with "\\n\\n", tokenise once,
non-overlapping windows of `seqlen`, each window scored independently (no context carried over).

The head and the cross-entropy run in chunks of positions, so a batch of windows never materialises
full-vocabulary logits at once (16x128 positions of a 49k-word head would be 400 MB).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import load_ids
from ..errors import CompruneError
from ..models.adapters import get_adapter
from . import compiled
from .compiled import Compiled

# Positions per head/cross-entropy chunk: a chunk's float32 logits (256 x 49k words = 50 MB) touch fewer fresh
# pages and stay closer to the cache than 1,024's 200 MB (which made the head 1.5x slower on SmolLM2 in bf16).
HEAD_CHUNK = 256
COMPILED_HEAD_CHUNK = 512  # compiled, the float32 logits are never materialised: only the bf16/fp32 head output


def token_windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None = None, bos: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens; with `bos`, each is <bos> + seqlen-1 text tokens (every text
    token is then scored, the first one after <bos>)."""
    if seqlen <= 1:
        raise CompruneError(f"seqlen must be > 1 (got {seqlen}): use e.g. --seqlen 128")
    if max_tokens is not None:
        if max_tokens < seqlen:
            raise CompruneError(f"--max-tokens {max_tokens} is smaller than seqlen {seqlen}: raise it")
        ids = ids[:max_tokens]
    body = seqlen - (bos is not None)
    n = ids.numel() // body
    if n == 0:
        raise CompruneError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    w = ids[: n * body].view(n, body)
    return w if bos is None else torch.cat([torch.full((n, 1), bos, dtype=w.dtype), w], 1)


def bos_of(model) -> int | None:
    """The <bos> id every evaluation window starts with, for families trained that way (Gemma); else None."""
    try:
        if not get_adapter(model).needs_bos:
            return None
    except CompruneError:  # a family comprune cannot prune is still evaluated, as it comes
        return None
    return model.config.bos_token_id


def chunked_nll(hidden: torch.Tensor, labels: torch.Tensor, head, chunk: int | None = None,
                logit_fn=None, nll_fn=None) -> torch.Tensor:
    """Sum of token NLLs for hidden [P, d] against labels [P], computing the head `chunk` rows at a time
    (`nll_fn(hidden_chunk, labels_chunk)`, e.g. a compiled one, replaces head + cross-entropy)."""
    chunk = chunk or HEAD_CHUNK
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for i in range(0, hidden.shape[0], chunk):
        if nll_fn is not None:
            total += nll_fn(hidden[i:i + chunk], labels[i:i + chunk]).double()
            continue
        logits = head(hidden[i:i + chunk]).float()
        if logit_fn is not None:
            logits = logit_fn(logits)
        total += F.cross_entropy(logits, labels[i:i + chunk], reduction="sum").double()
    return total


def family_logits(model):
    """What the family's *ForCausalLM does after lm_head (Granite divides by logits_scaling, Gemma soft-caps), as a
    function of the logits; None for Llama/Mistral/Qwen2."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    scale = getattr(model.config, "logits_scaling", None)
    if not cap and scale in (None, 1, 1.0):
        return None

    def fn(x):
        x = x / scale if scale not in (None, 1, 1.0) else x
        return torch.tanh(x / cap) * cap if cap else x
    return fn


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor, batch_size: int, progress: bool = True, desc: str = "ppl",
               compile: bool = False):
    """Total NLL, predicted-token count and {first_batch: (seconds, tokens), compiled: bool} over windows [N, T]
    (positions 1..T-1 of each window); `compile`
    runs the decoder layers and the head's cross-entropy through torch.compile (evaluate/compiled.py)."""
    device = next(model.parameters()).device
    base, head = model.base_model, model.get_output_embeddings()
    logit_fn = family_logits(model)
    nll = torch.zeros((), dtype=torch.float64)
    count, first = 0, None
    t0 = time.perf_counter()
    bar = tqdm(total=windows.numel(), desc=desc, unit="tok", unit_scale=True, disable=not progress,
               dynamic_ncols=True)
    with Compiled(model, compile, logit_fn) as fast:
        for i in range(0, windows.shape[0], batch_size):
            batch = windows[i:i + batch_size].to(device)
            hidden = fast.run(lambda b: base(input_ids=b, use_cache=False).last_hidden_state, batch)
            h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            y = batch[:, 1:].reshape(-1)
            nll += chunked_nll(h, y, head, chunk=COMPILED_HEAD_CHUNK if fast.enabled else None, logit_fn=logit_fn,
                               nll_fn=fast.head_nll if fast.enabled else None).cpu()
            count += y.numel()
            bar.update(batch.numel())
            first = first or (time.perf_counter() - t0, batch.numel())
    bar.close()
    # the first batch's (seconds, tokens): torch.compile compiles there
    return nll.item(), count, {"first_batch": first, "compiled": fast.enabled}


def perplexity(model, tokenizer, dataset: str = "wikitext2", seqlen: int = 128, max_tokens: int | None = None,
               batch_size: int | None = None, data_dir=None, progress: bool = True, ids: torch.Tensor | None = None,
               compile: bool | str = False):
    """Perplexity on a named dataset (or a pre-tokenised stream `ids`). Returns a JSON-ready dict. `compile`
    (True, False or "auto", the CLI's default: slices of at least compiled.AUTO_MIN_TOKENS) fuses what runs
    between the matmuls with torch.compile: faster on long slices, ~10-30 s of compilation first, eager where
    compilation fails."""
    if ids is None:
        ids = load_ids(tokenizer, dataset, data_dir)
    bos = bos_of(model)
    windows = token_windows(ids, seqlen, max_tokens, bos)
    # ~2k tokens per forward keeps the matmuls large (near the CPU's peak) with bounded activations.
    batch_size = batch_size or max(1, 2048 // seqlen)
    compile = compiled.resolve(compile, windows.numel())
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    nll, count, info = window_nll(model, windows, batch_size, progress, desc=f"ppl {dataset}@{seqlen}", compile=compile)
    seconds = time.perf_counter() - t0
    first_seconds, first_tokens = info["first_batch"]
    model.train(was_training)
    ppl = math.exp(nll / count)
    # without the first batch (torch.compile's compilation, warm-up): the evaluator's rate on a long slice
    steady = ((windows.numel() - first_tokens) / (seconds - first_seconds)
              if windows.numel() > first_tokens and seconds > first_seconds else None)
    return {"dataset": dataset, "seqlen": seqlen, "max_tokens": max_tokens, "windows": int(windows.shape[0]),
            "tokens": int(windows.numel()), "scored_tokens": count, "bos": bos is not None, "ppl": ppl, "seconds": round(seconds, 3),
            "tokens_per_second": round(windows.numel() / seconds, 1),
            "first_batch_seconds": round(first_seconds, 3),
            "steady_tokens_per_second": round(steady, 1) if steady else None, "compiled": info["compiled"],
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
