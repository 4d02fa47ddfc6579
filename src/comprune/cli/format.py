"""What every command shares: the common options and the output formatting (plain tables; --json is printed
by each command)."""
from __future__ import annotations

import argparse

from ..errors import CompruneError


def ints(text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise CompruneError(f"expected comma-separated integers, got '{text}'") from None


def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise CompruneError(f"expected comma-separated numbers, got '{text}'") from None


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def add_common(p: argparse.ArgumentParser):
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--dtype", default="auto", help="auto (default: bfloat16 on CPUs with AMX/AVX512_BF16 when a "
                   "short matmul probe confirms it is faster, bfloat16 or float16 on CUDA, float32 otherwise), "
                   "float32, float16, bfloat16")
    p.add_argument("--data-dir", default=None, help="data directory (default: $COMPRUNE_DATA, then ../shared/data)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run code shipped in the model directory (auto_map); never without this flag")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickle weights (pytorch_model.bin) through torch's restricted unpickler; refused "
                        "without this flag (pickles can run code): prefer safetensors")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON only")
