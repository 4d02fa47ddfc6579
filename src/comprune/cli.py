"""`comprune prune|eval|export|compare|info`: a thin shell over the Python API."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import CompruneError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise CompruneError(f"expected comma-separated integers, got '{text}'") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise CompruneError(f"expected comma-separated numbers, got '{text}'") from None


def _table(rows: list[dict], cols: list[str]) -> str:
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


def _add_common(p: argparse.ArgumentParser):
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default; fastest on CPUs without AVX-512 bf16), "
                   "float16, bfloat16")
    p.add_argument("--data-dir", default=None, help="data directory (default: $COMPRUNE_DATA, then ../shared/data)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run code shipped in the model directory (auto_map); never without this flag")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickle weights (pytorch_model.bin) through torch's restricted unpickler; refused "
                        "without this flag (pickles can run code): prefer safetensors")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON only")


def cmd_eval(args) -> int:
    from . import load
    from .evaluate.perplexity import perplexity
    if not args.ppl and not getattr(args, "tasks", None):
        args.ppl = "wikitext2"
    for name in ("batch_size", "max_tokens", "limit", "subset"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise CompruneError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    seqlens = _ints(args.seqlen)
    model, tok = load(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                      allow_pickle=args.allow_pickle)
    results = []
    if args.ppl:
        for seqlen in seqlens:
            r = perplexity(model, tok, args.ppl, seqlen=seqlen, max_tokens=args.max_tokens,
                           batch_size=args.batch_size, data_dir=args.data_dir, progress=not args.json)
            results.append({"model": args.model, **r})
    zeroshot = None
    if getattr(args, "tasks", None):
        from .evaluate.zeroshot import evaluate_zeroshot, format_zeroshot_table
        zeroshot = evaluate_zeroshot(model, tok, args.tasks, limit=args.limit, subset=args.subset,
                                     data_dir=args.data_dir, batch_size=args.batch_size or 16,
                                     progress=not args.json)
    if args.json:
        out = results[0] if len(results) == 1 and zeroshot is None else (
            {"model": args.model, "perplexity": results, "zeroshot": zeroshot} if zeroshot else results)
        print(json.dumps(out, indent=2))
    else:
        if results:
            print(_table(results, ["model", "dataset", "seqlen", "windows", "tokens", "ppl", "seconds",
                                   "tokens_per_second"]))
        if zeroshot is not None:
            print(format_zeroshot_table(zeroshot))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="perplexity (and zero-shot tasks) of a dense or pruned model")
    p.add_argument("model", help="'smollm2', a model directory, a .gguf file or a hub id")
    p.add_argument("--ppl", default=None, help="perplexity dataset: wikitext2 (default), c4, or a .txt/.jsonl file")
    p.add_argument("--seqlen", default="128", help="window length(s), comma-separated (e.g. 128,2048)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the stream")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--tasks", default=None, help="zero-shot tasks, comma-separated, or 'paper7'")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: first N examples per task")
    p.add_argument("--subset", type=int, default=None, help="zero-shot: N examples per task drawn with a fixed seed")
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    from . import cli_prune  # the prune/export/compare commands live beside their APIs
    cli_prune.add_commands(sub, _add_common)
    return parser


def _no_stdin():
    """comprune never reads stdin: nothing (e.g. transformers' remote-code y/N prompt) can be answered through it."""
    if getattr(sys.stdin, "name", None) == os.devnull:
        return
    try:
        sys.stdin = open(os.devnull)
    except OSError:
        sys.stdin = None


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _no_stdin()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CompruneError as e:
        print(f"comprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("comprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
