"""Running GGUF files with llama.cpp in-process (xllamacpp, the `[llamacpp]` extra): a server, completions and
next-token log-probabilities (used to check an export against transformers and to time generation)."""
from __future__ import annotations

from .. import deferred
from ..errors import CompruneError, require


def llamacpp_server(gguf_path, n_ctx: int = 512, threads: int = 2, exact: bool = False, quiet: bool = True):
    """An in-process llama.cpp server (xllamacpp) for the GGUF file; call `handle_completions` on it.

    `exact` keeps attention in f32 (llama.cpp's defaults, an f16 KV cache and CPU flash attention, round
    K and V to f16), so an f32 GGUF reproduces transformers to ~1e-6. `quiet` silences llama.cpp's log.
    """
    try:
        xllamacpp = deferred.xllamacpp()
    except ImportError:
        raise CompruneError("running GGUF files needs llama.cpp bindings: pip install xllamacpp") from None
    params = xllamacpp.CommonParams()
    params.model.path = str(gguf_path)
    params.n_ctx = n_ctx
    params.n_parallel = 1
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    if quiet:
        params.verbosity = -1
    if exact:
        params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
        params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    try:
        return xllamacpp.Server(params)
    except RuntimeError as e:
        raise CompruneError(f"llama.cpp could not load {gguf_path} (run with quiet=False for its log): {e}") from None


def complete(server, request: dict) -> dict:
    """One /completion call; llama.cpp errors come back as a dict, raise them instead."""
    out = server.handle_completions(request)
    if not isinstance(out, dict) or "error" in out:
        raise CompruneError(f"llama.cpp completion failed: {out}")
    return out


def next_token_logprobs(server, prompt: list[int] | str, n_probs: int, force: int | None = None) -> dict[int, float]:
    """log-softmax of llama.cpp's next-token logits after `prompt` (token ids, or text that llama.cpp
    tokenizes itself), for the top `n_probs` tokens.

    The server withholds a sampled token that is an incomplete UTF-8 sequence, and its probabilities with
    it; `force` (a plain-text token id) makes that token the sampled one without changing the raw logprobs.
    """
    prompt = prompt if isinstance(prompt, str) else [int(i) for i in prompt]
    request = {"prompt": prompt, "n_predict": 1, "temperature": 0, "n_probs": n_probs, "cache_prompt": False}
    if force is not None:
        request["logit_bias"] = [[int(force), 1000.0]]
    top = complete(server, request)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    return {t["id"]: t["logprob"] for t in top}


def token_logprob(server, ids: list[int], target: int, plain: int, n_vocab: int) -> float:
    """llama.cpp's raw log p(target | ids), for perplexity.

    A logit bias forces `target` to be sampled; the reported logprob is computed before sampling, and the
    prompt cache makes each call cost one new token. When `target` is an incomplete UTF-8 piece the server
    withholds its logprob, so ask for the whole distribution with `plain` forced instead (rare, slower).
    """
    request = {"prompt": list(ids), "n_predict": 1, "temperature": 0, "n_probs": 1,
               "logit_bias": [[int(target), 1000.0]], "cache_prompt": True}
    probs = complete(server, request)["choices"][0]["logprobs"]
    if probs is None:
        return next_token_logprobs(server, ids, n_vocab, force=plain)[int(target)]
    step = probs["content"][0]
    require(step["id"] == target, f"llama.cpp sampled {step['id']}, not the forced token {target}")
    return float(step["logprob"])


def _timed(server, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prompt tokens/s, generation tokens/s) of one greedy completion, from llama.cpp's own timings."""
    out = complete(server, {"prompt": list(prompt_ids), "n_predict": new_tokens, "temperature": 0,
                            "ignore_eos": True, "cache_prompt": False})
    t = out["timings"]
    require(t["predicted_n"] == new_tokens, f"llama.cpp generated {t['predicted_n']} tokens, not {new_tokens}")
    return float(t["prompt_per_second"]), float(t["predicted_per_second"])


def relative_llamacpp_speed(gguf_path, reference_path, prompt_ids: list[int], new_tokens: int = 64,
                            repeats: int = 3, threads: int = 2) -> dict:
    """llama.cpp prompt-processing and generation tokens/s of `gguf_path` and of `reference_path` (the dense
    export), measured alternately run by run (drifting background load hits both alike), after a warm-up each
    (weight repacking, page faults); medians and their ratios."""
    import statistics
    n_ctx = len(prompt_ids) + new_tokens + 8
    servers = [llamacpp_server(p, n_ctx=n_ctx, threads=threads) for p in (gguf_path, reference_path)]
    for s in servers:
        _timed(s, prompt_ids, min(8, new_tokens))
    runs = [[], []]
    for _ in range(repeats):
        for i, s in enumerate(servers):
            runs[i].append(_timed(s, prompt_ids, new_tokens))
    (pp, tg), (ref_pp, ref_tg) = ((statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
                                  for rs in runs)
    del servers
    return {"prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "repeats": repeats, "threads": threads,
            "prompt_tok_s": round(pp, 1), "gen_tok_s": round(tg, 1),
            "reference_prompt_tok_s": round(ref_pp, 1), "reference_gen_tok_s": round(ref_tg, 1),
            "prompt_relative": round(pp / ref_pp, 4), "gen_relative": round(tg / ref_tg, 4),
            "runtime": f"xllamacpp {getattr(deferred.xllamacpp(), '__version__', '?')}"}
