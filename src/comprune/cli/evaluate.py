"""comprune eval: perplexity and zero-shot scores of a dense or pruned model."""
from __future__ import annotations


from ..card import perplexity_entry, record_evaluation, zeroshot_entry
from ..errors import CompruneError
from ..outputs import json_text
from ..evaluate.chat import chat_measure, chat_reference
from ..evaluate.hardware import against_peak, use_sdpa
from ..evaluate.perplexity import perplexity
from ..evaluate.zeroshot import evaluate_zeroshot, format_zeroshot_table
from ..io import read_manifest
from ..loading import load
from .format import add_common, ints, table


def cmd_eval(args) -> int:
    if not args.ppl and not getattr(args, "tasks", None) and not getattr(args, "chat", False):
        args.ppl = "wikitext2"
    for name in ("batch_size", "max_tokens", "limit", "subset"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise CompruneError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    seqlens = ints(args.seqlen)
    model, tok = load(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                      allow_pickle=args.allow_pickle)
    use_sdpa(model)
    precision = model.comprune_precision
    results = []
    if args.ppl:
        for seqlen in seqlens:
            r = perplexity(model, tok, args.ppl, seqlen=seqlen, max_tokens=args.max_tokens,
                           batch_size=args.batch_size, data_dir=args.data_dir, progress=not args.json,
                           compile=args.compile)
            # the evaluator's rate against the peak is the steady one: the first batch holds the compilation
            rate = r["steady_tokens_per_second"] if r["compiled"] and r["steady_tokens_per_second"] else \
                r["tokens_per_second"]
            results.append({"model": args.model, **r, "precision": precision,
                            "hardware": against_peak(model, rate, seqlen)})
    zeroshot = None
    if getattr(args, "tasks", None):
        zeroshot = evaluate_zeroshot(model, tok, args.tasks, limit=args.limit, subset=args.subset,
                                     data_dir=args.data_dir, batch_size=args.batch_size or 16,
                                     progress=not args.json, runner=args.zeroshot_runner, heldout=args.heldout,
                                     compile=args.compile)
        zeroshot["precision"] = precision
    chat = _chat(args, model, tok) if getattr(args, "chat", False) else None
    for entry in card_entries(args, results, zeroshot):  # a pruned model's card shows what this run measured
        record_evaluation(args.model, entry)
    if chat is not None:
        record_evaluation(args.model, {"by": "comprune eval", "device": args.device, "what": "chat",
                                       "dtype": precision["dtype"], "heldout": chat["split"] == "heldout",
                                       "results": {"exact-answer hits": f"{chat['hits']}/{chat['questions']}",
                                                   "KL(dense || model), nats/token": chat.get("kl"),
                                                   "reference": chat["reference"]}})
    if args.json:
        out = {"model": args.model, "precision": precision, "perplexity": results, "zeroshot": zeroshot,
               "chat": chat} if chat else results[0] if len(results) == 1 and zeroshot is None else (
            {"model": args.model, "precision": precision, "perplexity": results, "zeroshot": zeroshot} if zeroshot
            else results)
        print(json_text(out, indent=2))
    else:
        if results:
            rows = [{**r, "dtype": r["dtype"], "GFLOP/s": r["hardware"]["achieved_gflops"],
                     "of peak": r["hardware"]["fraction_of_peak"]} for r in results]
            print(table(rows, ["model", "dataset", "seqlen", "windows", "tokens", "ppl", "seconds",
                               "tokens_per_second", "dtype", "compiled", "GFLOP/s", "of peak"]))
            print(f"precision: {precision['dtype']} ({precision['reason']}); peak = the {precision['dtype']} matmul "
                  "probe on this model's MLP shape (comprune.evaluate.hardware)")
        if zeroshot is not None:
            print(format_zeroshot_table(zeroshot))
        if chat is not None:
            print(f"chat ({chat['split']} half): {chat['hits']}/{chat['questions']} exact-answer hits" +
                  (f"; KL(dense || model) {chat['kl']:.4f} nats/token on {chat['kl_prompts']} dense answers "
                   f"(reference: {chat['reference']})" if "kl" in chat else "; no dense reference, no KL"))
    return 0


def _chat(args, model, tok) -> dict:
    """The chat measure, with the KL against --chat-reference (default: the base model pruning.json names)."""
    ref_spec = args.chat_reference
    if ref_spec is None and not str(args.model).endswith(".gguf"):
        ref_spec = (read_manifest(args.model) or {}).get("base_model")
    reference = None
    if ref_spec:
        dense, _ = load(ref_spec, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                        allow_pickle=args.allow_pickle)
        reference = chat_reference(dense, tok, args.chat_split)
    res = chat_measure(model, tok, reference, args.chat_split)
    res["reference"] = ref_spec
    return res


def card_entries(args, results: list, zeroshot: dict | None) -> list[dict]:
    """What `comprune eval` measured, as pruned models record it (pruning.json `evaluations`, the card)."""
    run = {"by": "comprune eval", "device": args.device}
    entries = [perplexity_entry({**run, "dtype": r["dtype"]}, r) for r in results]
    if zeroshot is not None:
        entries.append(zeroshot_entry({**run, "dtype": zeroshot["precision"]["dtype"]}, "zeroshot", zeroshot,
                                      subset=args.subset, limit=args.limit, heldout=bool(args.heldout)))
    return entries


def add_command(sub):
    p = sub.add_parser("eval", help="perplexity (and zero-shot tasks) of a dense or pruned model")
    p.add_argument("model", help="'smollm2', a model directory, a .gguf file or a hub id")
    p.add_argument("--ppl", default=None, help="perplexity dataset: wikitext2 (test, default), wikitext2-validation, c4, c4-validation (held-out documents: for choosing settings), or a .txt/.jsonl file")
    p.add_argument("--seqlen", default="128", help="window length(s), comma-separated (e.g. 128,2048)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the stream")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--tasks", default=None, help="zero-shot tasks, comma-separated, or 'paper7'")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: first N examples per task")
    p.add_argument("--subset", type=int, default=None, help="zero-shot: N examples per task drawn with a fixed seed")
    p.add_argument("--heldout", action="store_true",
                   help="zero-shot with --subset N: N other examples per task, disjoint from the reported subset "
                        "(for choosing settings)")
    p.add_argument("--zeroshot-runner", default="packed", choices=["packed", "hflm"],
                   help="zero-shot: 'packed' runs each context once for all its choices (default; lm_eval's numbers), "
                        "'hflm' is lm_eval's own per-request loop")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the decoder layers and the head's cross-entropy: 'auto' (default) for "
                        "perplexity slices of >= 131,072 tokens and the zero-shot tasks' full sets, where ~10-30 s "
                        "of compilation pays for itself; eager where compilation fails")
    p.add_argument("--chat", action="store_true",
                   help="the chat measure: exact-answer hits on short questions and KL(dense || model) on the dense "
                        "model's greedy answers, through the chat template (docs/comparison.md)")
    p.add_argument("--chat-split", default="test", choices=["test", "heldout"],
                   help="--chat: the reported half (test, default) or the half for choosing settings (heldout)")
    p.add_argument("--chat-reference", default=None,
                   help="--chat: the dense model of the KL (default: the base model in pruning.json; none for a "
                        "dense model)")
    add_common(p)
    p.set_defaults(func=cmd_eval)
