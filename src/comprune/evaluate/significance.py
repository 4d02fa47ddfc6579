"""Is one model's zero-shot score different from another's? Paired tests on per-example correctness.

Both models answer the very same examples, so the comparison is paired: what matters is where they disagree.

- Per task, McNemar's exact test: among the examples exactly one model gets right (n01 vs n10), is the split
  further from 50/50 than chance? Two-sided binomial p-value.
- The seven-task average: a paired bootstrap. Each task's examples are resampled with replacement (the same
  draw for both models), the difference of the averages recomputed; the 95 % interval of that difference and
  a two-sided p-value (twice the smaller tail around zero) are reported.

Standard error of an average over tasks: sqrt(sum of the tasks' squared standard errors) / number of tasks (the
tasks are independent samples).
"""
from __future__ import annotations

import math

import numpy as np


def average_stderr(stderrs: list[float]) -> float | None:
    if not stderrs or any(s is None for s in stderrs):
        return None
    return math.sqrt(sum(s * s for s in stderrs)) / len(stderrs)


def _binom_two_sided(k: int, n: int) -> float:
    """P(|X - n/2| >= |k - n/2|) for X ~ Binomial(n, 1/2)."""
    if n == 0:
        return 1.0
    lo = min(k, n - k)
    log_tail = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
                for i in range(lo + 1)]
    top = max(log_tail)
    tail = math.exp(top) * sum(math.exp(x - top) for x in log_tail)
    return min(1.0, 2 * tail)


def mcnemar(a: str, b: str) -> dict:
    """Exact McNemar test of two 0/1 strings over the same examples."""
    if len(a) != len(b):
        raise ValueError(f"paired results of different lengths ({len(a)} vs {len(b)})")
    n01 = sum(1 for x, y in zip(a, b) if x == "0" and y == "1")
    n10 = sum(1 for x, y in zip(a, b) if x == "1" and y == "0")
    return {"n": len(a), "only_a": n10, "only_b": n01, "p": float(f"{_binom_two_sided(n10, n01 + n10):.4g}")}


def paired_bootstrap(a: dict, b: dict, iters: int = 2000, seed: int = 0) -> dict:
    """`a`, `b`: task -> 0/1 string (same tasks, same examples). Difference of the mean-over-tasks accuracy
    (a - b), its 95 % bootstrap interval and two-sided p-value."""
    tasks = sorted(a)
    rng = np.random.default_rng(seed)
    diffs = np.zeros(iters)
    point = 0.0
    for t in tasks:
        x = np.frombuffer(a[t].encode(), dtype=np.uint8) - ord("0")
        y = np.frombuffer(b[t].encode(), dtype=np.uint8) - ord("0")
        if x.shape != y.shape:
            raise ValueError(f"{t}: paired results of different lengths ({x.size} vs {y.size})")
        d = (x.astype(np.float64) - y) / len(tasks)
        point += d.mean()
        idx = rng.integers(0, d.size, size=(iters, d.size))
        diffs += d[idx].mean(axis=1)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    p = min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean()))
    return {"diff": round(float(point), 6), "ci95": [round(float(lo), 6), round(float(hi), 6)],
            "p": round(float(p), 4), "iters": iters, "tasks": tasks}


def compare_runs(a: dict, b: dict, iters: int = 2000) -> dict | None:
    """Paired tests between two zero-shot results (evaluate_zeroshot(..., per_example=True) task dicts): per
    task McNemar, and the paired bootstrap of the average over the tasks both have on the same examples."""
    common = [t for t in a if t in b and a[t].get("correct") and b[t].get("correct")
              and a[t].get("doc_ids") == b[t].get("doc_ids")]
    if not common:
        return None
    return {"tasks": {t: mcnemar(a[t]["correct"], b[t]["correct"]) for t in common},
            "average": paired_bootstrap({t: a[t]["correct"] for t in common}, {t: b[t]["correct"] for t in common},
                                        iters)}
