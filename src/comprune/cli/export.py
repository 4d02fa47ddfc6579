"""comprune export: a (pruned) model directory as a GGUF file for llama.cpp."""
from __future__ import annotations

import argparse

from ..errors import CompruneError
from ..outputs import json_text
from ..export.gguf import QTYPES, export_gguf
from ..export.gguf_quant import QUANT_TYPES
from .format import table


def cmd_export(args) -> int:
    if not args.gguf:
        raise CompruneError("nothing to export: pass --gguf OUT.gguf")
    imatrix = None
    use = args.imatrix
    if use is None:  # default: for the low-bit types, where the model records its calibration windows
        from ..export.imatrix import has_calibration
        use = args.type in QUANT_TYPES and has_calibration(args.model_dir)
    if use or args.imatrix_data:
        from ..export.imatrix import imatrix_for, source_windows
        windows = None
        if args.imatrix_data:
            windows = source_windows(args.model_dir, args.imatrix_data, data_dir=args.data_dir)
        imatrix = imatrix_for(args.model_dir, windows, data_dir=args.data_dir)
    summary = export_gguf(args.model_dir, args.gguf, qtype=args.type, force=args.force, pad_to=args.pad_to,
                          imatrix=imatrix)
    if args.json:
        print(json_text(summary, indent=2))
    else:
        print(table([{k: v for k, v in summary.items() if not isinstance(v, (list, dict))}],
                    [k for k, v in summary.items() if not isinstance(v, (list, dict))]))
    return 0


def add_command(sub):
    p = sub.add_parser("export", help="export a (pruned) model directory for on-device runtimes")
    p.add_argument("model_dir")
    p.add_argument("--gguf", default=None, help="write a GGUF file for llama.cpp")
    p.add_argument("--type", default="f16", choices=list(QTYPES),
                   help="f32, f16, q8_0, or a type llama.cpp's quantizer writes with its per-tensor mix: q4_0, q4_1, "
                        "q5_0, q5_1, q2_k, q3_k_m, q4_k_m (what most users run), q5_k_m, q6_k")
    p.add_argument("--pad-to", type=int, default=None,
                   help="write MLP widths rounded up to a multiple of this with zero neurons (same outputs; default "
                        "32, which llama.cpp's kernels run much faster than odd widths; 1: the exact widths; 256: whole "
                        "K-quant blocks instead of llama.cpp's fallback types)")
    p.add_argument("--imatrix", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize with an importance matrix collected on the model from its prune's calibration "
                        "windows (pruning.json; cached beside the model in imatrix/). Default: on for the types "
                        "below q8_0 when the model records its calibration (SmolLM2, WikiText-2 validation: "
                        "-3 to -8 %% perplexity); --no-imatrix: llama.cpp's plain quantization")
    p.add_argument("--imatrix-data", default=None,
                   help="collect the importance matrix from 128 windows of 128 tokens of this calibration source "
                        "(c4, wikitext2, ...) instead, e.g. for a dense model")
    p.add_argument("--data-dir", default=None, help="where the calibration data lives (default: the usual places)")
    p.add_argument("--force", action="store_true", help="replace an existing --gguf file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)
