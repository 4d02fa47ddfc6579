"""torch.compile for the evaluator: the decoder layers and the head's cross-entropy, compiled while an
evaluation runs and restored after it.

In eager PyTorch on a CPU the matmuls of a small model are fast and everything between them is not: RMSNorm
upcasts to float32 and back, rotary embeddings, SiLU x up and the residual adds each make a pass over memory,
and the head's [positions x vocab] logits are converted to float32 and log-softmaxed in separate passes.
Inductor fuses those passes. On SmolLM2 in bfloat16 on a 2-core AMX host this took the decoder from ~3,400 to
~4,500 tokens/s and the head's cross-entropy from ~8,000 to ~13,000 tokens/s; the whole evaluator at seqlen 128
from 1,540 tokens/s (eager with 1,024-position head chunks, 32 % of the bf16 matmul probe's peak; ~2,100 eager
with today's 256) to 2,952 (74 %, full test set: benchmarks/results/eval_speed_amx_full.md).

The layers are compiled one module at a time: transformers' decoder layers share one forward, so the graph is
compiled once and reused by every layer of the same shapes (a pruned model's different widths recompile, then
go dynamic). Compilation needs a C++ compiler; where it is missing or fails, the evaluation warns once and
runs eager, with the same numbers up to float rounding.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..errors import CompruneError
from ..models.adapters import get_adapter


def _decoder_layers(model):
    try:
        return list(get_adapter(model).layers(model))
    except CompruneError:  # a family comprune cannot prune is evaluated as it comes, eager
        return []


class Compiled:
    """`with Compiled(model) as c:` compiles the decoder layers for the block; `c.run(fn, *args)` calls fn and,
    if compilation fails, turns compilation off, warns once and calls fn again eager. `c.head_nll` is the
    head + cross-entropy of a chunk of positions, compiled while compilation is on."""

    def __init__(self, model, enabled: bool = True, logit_fn=None):
        self.model, self.logit_fn = model, logit_fn
        self.head = model.get_output_embeddings()
        self.layers = _decoder_layers(model) if enabled else []
        self.enabled = bool(self.layers)
        self._head_compiled = torch.compile(self._head_nll_eager, dynamic=True) if self.enabled else None

    def _head_nll_eager(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        if self.logit_fn is not None:
            logits = self.logit_fn(logits)
        return F.cross_entropy(logits, labels, reduction="sum")

    def head_nll(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            return self.run(self._head_compiled, hidden, labels, eager=self._head_nll_eager)
        return self._head_nll_eager(hidden, labels)

    def __enter__(self):
        for layer in self.layers if self.enabled else []:
            layer.compile(dynamic=None)
        return self

    def __exit__(self, *exc):
        self._restore()
        if self.layers:
            # dynamo's per-code-object cache is shared by every model whose layers share a forward: a process
            # evaluating many models (benchmarks/compare.py) would hit its recompile limit and fall back to eager
            torch._dynamo.reset()
        return False

    def _restore(self):
        for layer in self.layers:
            layer._compiled_call_impl = None  # what nn.Module.compile() set: the module's own forward again

    def run(self, fn, *args, eager=None, **kwargs):
        if not self.enabled:
            return (eager or fn)(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except (CompruneError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - inductor's failures have many types (no compiler, unsupported op)
            self.enabled = False
            self._restore()
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {first}); evaluating eager "
                          "(pass --compile off to skip the attempt)", RuntimeWarning, stacklevel=2)
            return (eager or fn)(*args, **kwargs)


# Below this many tokens compilation (~10 s warm, ~30 s cold on SmolLM2) costs more than it saves: at ~1.6x the
# eager rate the break-even is ~40 k tokens warm, ~130 k cold. The full WikiText-2 test set (~290 k) compiles;
# the comparison's 16 k-token slice does not.
AUTO_MIN_TOKENS = 131_072


def resolve(mode, tokens: int | None) -> bool:
    """Whether an evaluation of `tokens` tokens compiles: mode True/False, or "auto" (long ones only; `tokens`
    None means open-ended, e.g. the zero-shot tasks' full sets)."""
    if mode in (True, False):
        return mode
    if mode in ("on", "off"):
        return mode == "on"
    if mode != "auto":
        raise CompruneError(f"compile must be auto, on or off (got {mode!r})")
    return tokens is None or tokens >= AUTO_MIN_TOKENS
