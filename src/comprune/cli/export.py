"""comprune export: a (pruned) model directory as a GGUF file for llama.cpp."""
from __future__ import annotations


from ..errors import CompruneError
from ..outputs import json_text
from ..export.gguf import export_gguf
from .format import table


def cmd_export(args) -> int:
    if not args.gguf:
        raise CompruneError("nothing to export: pass --gguf OUT.gguf")
    summary = export_gguf(args.model_dir, args.gguf, qtype=args.type, force=args.force, pad_to=args.pad_to)
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
    p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0"])
    p.add_argument("--pad-to", type=int, default=None,
                   help="write MLP widths rounded up to a multiple of this with zero neurons (same outputs; default "
                        "32, which llama.cpp's kernels run much faster than odd widths; 1: the exact widths)")
    p.add_argument("--force", action="store_true", help="replace an existing --gguf file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)
