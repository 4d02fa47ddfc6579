"""Self-calibration on SmolLM2 at 20 %: COMP calibrated on C4, on the dense model's own chat answers (`--calib
self`) and on a 50/50 mix, beside the dense model and the width search (C4), on perplexity and the chat measure.

    python benchmarks/self_calibration.py                       # resumes: every measure is saved as it completes
    python benchmarks/self_calibration.py --prepruned /work/prunes --models-dir ~/.cache/comprune/selfcal-bench

Rows: dense; `comp` and `comp-search` at 20 % calibrated on C4 (pre-pruned directories, when present in
--prepruned); `comp` pruned here with `--calib self` and `--calib self:0.5,c4:0.5`. Measures: PPL@2048 on the
first --heldout-tokens tokens of WikiText-2 *validation* and of the C4 held-out documents (held out: settings are
chosen on these and on the chat measure's held-out half), on the first --max-tokens WikiText-2 *test* tokens
(reported), and the chat measure (comprune.evaluate.chat) on both halves. With --lock FILE, each prune and each
measure of one model holds that file's flock (a shared machine). Writes benchmarks/results/self_calibration.json/.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

CALIBS = {"self": "self", "self+c4": "self:0.5,c4:0.5"}
PPL_SETS = ("wikitext2-validation", "c4-validation", "wikitext2")  # held out, held out, test


class _Lock:
    """The shared machine's lock for heavy work, held for one unit (a prune, one measure of one model) at a time."""
    path = None

    def __enter__(self):
        import fcntl
        self.f = open(self.path, "a") if self.path else None
        if self.f:
            fcntl.flock(self.f, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        if self.f:
            self.f.close()


def _save(path: Path, rec: dict):
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    tmp.replace(path.with_suffix(".json"))


def _prune(calib: str, out: Path, ratio: float) -> dict:
    cmd = [sys.executable, "-m", "comprune.cli", "prune", "smollm2", "--ratio", str(ratio), "--calib", calib,
           "--out", str(out), "--json", "--force"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")})
    if r.returncode != 0:
        raise SystemExit(f"prune --calib {calib} failed: {r.stderr.strip().splitlines()[-1:]}")
    rep = json.loads(r.stdout)
    return {"command": "comprune " + " ".join(cmd[3:]), "wall_seconds": round(time.perf_counter() - t0, 1),
            "seconds": rep.get("seconds"), "ratio_achieved": rep.get("ratio_achieved"),
            "calibration": rep.get("calibration"), "precision": rep.get("precision")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--prepruned", default="/work/prunes")
    ap.add_argument("--models-dir", default=str(Path.home() / ".cache" / "comprune" / "selfcal-bench"))
    ap.add_argument("--max-tokens", type=int, default=32768, help="WikiText-2 test tokens (reported)")
    ap.add_argument("--heldout-tokens", type=int, default=16384, help="tokens of each held-out set")
    ap.add_argument("--out", default=str(HERE / "results" / "self_calibration"))
    ap.add_argument("--lock", default="", help="a file to flock around each prune and measure (a shared machine)")
    args = ap.parse_args(argv)
    _Lock.path = args.lock or None
    import torch

    import comprune
    from comprune.evaluate.chat import chat_measure, chat_reference
    from comprune.precision import host

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    rec = json.loads(path.read_text()) if path.is_file() else {}
    rec.update({"command": "python benchmarks/self_calibration.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "ratio": args.ratio, "max_tokens": args.max_tokens, "heldout_tokens": args.heldout_tokens,
                "seqlen": 2048})
    rows = rec.setdefault("rows", {})
    pct = f"{args.ratio:.2f}"
    specs = {"dense": "smollm2", "comp c4": f"{args.prepruned}/smollm2-comp-{pct}"}
    for name, calib in CALIBS.items():
        d = Path(args.models_dir) / f"smollm2-comp-{name}-{pct}"
        row = rows.setdefault(f"comp {name}", {})
        if "prune" not in row or not (d / "pruning.json").is_file():
            print(f"pruning comp --calib {calib}", file=sys.stderr, flush=True)
            with _Lock():
                row["prune"] = _prune(calib, d, args.ratio)
            _save(out, rec)
        specs[f"comp {name}"] = str(d)
    search = Path(args.prepruned) / f"smollm2-comp-search-{pct}"
    if (search / "pruning.json").is_file():
        specs["comp-search c4"] = str(search)
    for name, spec in specs.items():
        rows.setdefault(name, {})["model"] = spec

    loaded = {}

    def dense():  # loaded only when something is left to measure
        if not loaded:
            loaded["model"], loaded["tok"] = comprune.load("smollm2", dtype="auto")
        return loaded["model"], loaded["tok"]

    refs = {}
    for name, spec in specs.items():  # the chat measure first (a minute a model), then perplexity
        row = rows[name]
        todo = [s for s in ("heldout", "test") if f"chat:{s}" not in row]
        if not todo:
            continue
        with _Lock():
            d, tok = dense()
            model = d if name == "dense" else comprune.load(spec, dtype="auto")[0]
        for split in todo:
            with _Lock():
                if split not in refs:
                    refs[split] = chat_reference(d, tok, split)
                row[f"chat:{split}"] = chat_measure(model, tok, refs[split], split)
            row[f"chat:{split}"]["host"] = host()
            print(f"{name} chat {split}: {row[f'chat:{split}']['hits']} hits, KL {row[f'chat:{split}']['kl']:.4f}",
                  file=sys.stderr, flush=True)
            _save(out, rec)
    order = [n for n in specs if n.startswith("comp self")] + [n for n in specs if not n.startswith("comp self")]
    for dataset in PPL_SETS:  # the new rows first, the held-out sets before the test set
        for name in order:
            spec = specs[name]
            row, key = rows[name], f"ppl:{dataset}"
            if key in row:
                continue
            with _Lock():
                d, tok = dense()
                model = d if name == "dense" else comprune.load(spec, dtype="auto")[0]
                r = comprune.perplexity(model, tok, dataset, seqlen=2048, progress=False,
                                        max_tokens=args.max_tokens if dataset == "wikitext2" else args.heldout_tokens)
            row[key] = {k: r.get(k) for k in ("ppl", "tokens", "windows", "seconds", "dtype")} | {"host": host()}
            print(f"{name} {dataset}: {r['ppl']:.3f}", file=sys.stderr, flush=True)
            _save(out, rec)
    _rescore(rows)
    rec["machine"] = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    rec["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _save(out, rec)
    out.with_suffix(".md").write_text(markdown(rec) + "\n")
    print(markdown(rec))


def _rescore(rows: dict):
    """Hits recomputed from the stored replies with the current rule (a pure function of the reply's text)."""
    from comprune.evaluate.chat import chat_items, is_hit
    for row in rows.values():
        for split in ("heldout", "test"):
            c = row.get(f"chat:{split}")
            if c is None:
                continue
            answers = {q["question"]: q["answers"] for q in chat_items(split)[1]}
            for r in c["replies"]:
                r["hit"] = is_hit(r["reply"], answers[r["question"]])
            c["hits"] = sum(r["hit"] for r in c["replies"])
            c["hit_rate"] = c["hits"] / c["questions"]


def markdown(rec: dict) -> str:
    rows = rec["rows"]
    dense = rows.get("dense", {})

    def ppl(row, ds):
        v = row.get(f"ppl:{ds}", {}).get("ppl")
        d = dense.get(f"ppl:{ds}", {}).get("ppl")
        return "-" if v is None else f"{v:.2f}" + (f" ({v / d:.2f}×)" if d and row is not dense else "")

    def chat(row, split):
        c = row.get(f"chat:{split}")
        return "-" if c is None else f"{c['hits']}/{c['questions']} / {c['kl']:.3f}"

    mt, ht = rec["max_tokens"] // 1024, rec.get("heldout_tokens", rec["max_tokens"]) // 1024
    lines = [f"# Self-calibration: SmolLM2-135M-Instruct, COMP at {rec['ratio']:.0%}", "",
             f"Command: `{rec['command']}`  ",
             f"PPL@2048 on the first {ht}k tokens of each held-out set and {mt}k of WikiText-2 test (× dense). Chat: exact-answer hits / KL(dense ‖ model) "
             "in nats per token on the dense model's greedy answers (comprune.evaluate.chat). Held out (to choose): "
             "WikiText-2 validation, C4 held-out documents, the chat set's held-out half. Reported: WikiText-2 test, "
             "the chat set's test half.", "",
             "| model | calibration | WikiText-2 val (held out) | C4 val (held out) | chat held-out half | "
             "WikiText-2 test | chat test half |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        calib = "-" if name == "dense" else name.split(" ", 1)[1]
        lines.append(f"| {name.split(' ')[0]} | {calib} | {ppl(row, 'wikitext2-validation')} | "
                     f"{ppl(row, 'c4-validation')} | {chat(row, 'heldout')} | {ppl(row, 'wikitext2')} | "
                     f"{chat(row, 'test')} |")
    lines += ["", "Prunes made here:", ""]
    for name, row in rows.items():
        if "prune" in row:
            p = row["prune"]
            lines.append(f"- {name}: `{p['command']}` ({p['wall_seconds']:.0f} s wall, calibration sha256 "
                         f"{p['calibration']['sha256'][:16]}…, {p['precision']['dtype']})")
    lines += ["", "Five test-half answers of each model (one of each kind of question):", "",
              "| question | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    first = next((r["chat:test"]["replies"] for r in rows.values() if "chat:test" in r), [])
    for k, q in list(enumerate(first))[::6][:5]:  # one of each kind: arithmetic, capitals, counts, colours, units
        cells = [rows[n].get("chat:test", {}).get("replies", [{}] * 5)[k].get("reply", "-").replace("\n", " ")
                 .replace("|", "\\|")[:120] for n in rows]
        lines.append(f"| {q['question']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
