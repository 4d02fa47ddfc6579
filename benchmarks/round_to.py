"""What `--round-to` buys in llama.cpp: generation and prompt speed of SmolLM2 with every MLP at a width that is
or is not a multiple of 32/64/128, the dense weights sliced (export.latency's variants: the values do not
change the time), each timed alternately with the dense export.

    python benchmarks/round_to.py                 # f16 and q8_0, widths around an odd 1070 (COMP 20 %: 1017)
    python benchmarks/round_to.py --types f16 --repeats 5

Writes benchmarks/results/round_to.json and .md. The quality side: a uniform prune rounds within one quantum of
the budget (a width 1070 becomes 1056 or 1088, ±1.5 % of the MLP), and the search's ladder steps (1/16 of 1536 =
96 neurons) are multiples of 32 already, so --round-to 32 costs the search nothing; 64 and 128 coarsen its
ladder to 12 levels (steps of 128).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

WIDTHS = (1070, 1056, 1088, 1024, 1152)  # odd (as COMP 20 %'s uniform 1017 is), then multiples of 32, 64, 128, 128


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="f16,q8_0")
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "round_to"),
                    help="results path without suffix (one file per machine: rows of two CPUs do not compare)")
    args = ap.parse_args(argv)
    from comprune.export.gguf import export_gguf
    from comprune.export.latency import sliced_variant
    from comprune.precision import cpu_name
    from comprune.export.llamacpp import relative_llamacpp_speed
    from comprune.stream import resolve_stream_source
    src = resolve_stream_source("smollm2")
    n_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    prompt = list(range(1, 129))
    out = Path(args.out).with_suffix(".json")
    res = json.loads(out.read_text()) if out.is_file() else {}
    res["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                      "threads": args.threads}
    rows = res.setdefault("rows", {})
    for qtype in args.types.split(","):
        with tempfile.TemporaryDirectory(prefix="comprune-round-to-") as d:
            d = Path(d)
            dense = export_gguf(src, d / "dense.gguf", qtype)["path"]
            for w in map(int, args.widths.split(",")):
                key = f"{qtype}/{w}"
                if key in rows:
                    continue
                sliced_variant(src, d / f"w{w}", n_layers, w)
                path = export_gguf(d / f"w{w}", d / f"w{w}.gguf", qtype, pad_to=1)  # the width as it is
                load0 = os.getloadavg()[0]
                rec = relative_llamacpp_speed(path["path"], dense, prompt, new_tokens=args.new_tokens,
                                              repeats=args.repeats, threads=args.threads)
                rows[key] = {"qtype": qtype, "width": w, "gguf_width": path["gguf_ffn_widths"][0], **rec,
                             "loadavg_before": load0, "loadavg_after": os.getloadavg()[0],
                             "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
                print(key, rows[key]["gen_relative"], rows[key]["prompt_relative"], flush=True)
                out.write_text(json.dumps(res, indent=1))
    lines = ["# --round-to: llama.cpp speed at MLP widths that are or are not multiples of 32/64/128", "",
             f"Command: `python benchmarks/round_to.py --types {args.types} --widths {args.widths} --repeats "
             f"{args.repeats}" + ("" if out.stem == "round_to" else f" --out {os.path.relpath(args.out, HERE.parent)}") + "`. SmolLM2 with all 30 MLPs at the width (dense weights sliced), GGUF exported, "
             f"timed in llama.cpp alternately with the dense export ({args.new_tokens} new tokens after a 128-token "
             f"prompt, median of {args.repeats}). Machine: {res['machine']['cpu']}, {os.cpu_count()} cores, "
             f"{args.threads} threads; load average in each row (shared machine: compare rows of one type only).",
             "", "| type | width | written as | multiple of | prompt tok/s | × dense | gen tok/s | × dense | load |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows.values(), key=lambda r: (r["qtype"], r["width"])):
        mult = ",".join(str(q) for q in (32, 64, 128) if r["width"] % q == 0) or "—"
        lines.append(f"| {r['qtype']} | {r['width']} | {r['gguf_width']} | {mult} | {r['prompt_tok_s']} | "
                     f"{r['prompt_relative']:.3f} | {r['gen_tok_s']} | {r['gen_relative']:.3f} | "
                     f"{r['loadavg_before']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
