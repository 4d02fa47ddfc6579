"""The model card (README.md) and the recipe (recipe.json) beside every pruned model.

Both are rendered from pruning.json alone, so they say only what the run recorded: the card's Hub metadata
(base model and licence where comprune knows them: its embedded models, or the source directory's own card),
the method and the settings that differ from the defaults, the ratio and parameters before/after, the calibration
data and its sha256, how to load the model, and the one command that prunes it again. `comprune eval` and
`comprune compare` append what they measure to pruning.json's `evaluations` and render the card again: its
numbers are those runs' numbers.

The recipe is the run's configuration as `comprune prune --recipe recipe.json --out DIR` reads it: the model it
pruned, the full PruneConfig, the precision it computed in and saved (which the bytes depend on) and whether it
streamed; the calibration's sha256 lets the prune check that it reads the same data.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from .config import PruneConfig
from .errors import CompruneError
from .outputs import json_text
from .precision import cpu_name

CARD = "README.md"
RECIPE = "recipe.json"
RECIPE_VERSION = 1

# comprune's embedded models: the Hub repository their weights come from, its licence, and the file comprune
# actually pruned (a quantized GGUF, dequantised: the card says so)
_SMOLLM2 = ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "SmolLM2-135M-Instruct.Q4_1.gguf")
KNOWN_BASES = {"smollm2": _SMOLLM2, "smollm2-135m": _SMOLLM2, "smollm2-135m-instruct": _SMOLLM2,
               "gemma3-270m": ("google/gemma-3-270m", "gemma", "gemma-3-270m-q4_k_m.gguf")}


# ------------------------------------------------------------------------------------------------ recipe
def recipe(manifest: dict) -> dict:
    """The recipe of a run, from its pruning.json."""
    precision = manifest.get("precision") or {}
    return {"comprune_recipe": RECIPE_VERSION, "model": manifest.get("base_model"),
            "config": manifest.get("config") or {}, "dtype": precision.get("dtype"),
            "save_dtype": precision.get("saved_dtype"), "stream": "streaming" in manifest,
            "calibration_sha256": (manifest.get("calibration") or {}).get("sha256"),
            "command": command(manifest)}


def command(manifest: dict, out: str = "OUT") -> str:
    model = manifest.get("base_model") or "MODEL"
    return f"comprune prune {_shell(model)} --recipe {RECIPE} --out {out}"


def _shell(word: str) -> str:
    return word if word and all(c.isalnum() or c in "-_./:=" for c in word) else "'" + word.replace("'", "'\\''") + "'"


def read_recipe(path) -> dict:
    """A recipe file (or a pruned model's directory holding one), checked."""
    path = Path(path)
    if path.is_dir():
        path = path / RECIPE
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompruneError(f"no recipe at {path}: pass a recipe.json written beside a pruned model") from None
    except (OSError, ValueError) as e:
        raise CompruneError(f"cannot read the recipe {path} ({e}): pass a recipe.json written by comprune") from None
    if not isinstance(rec, dict) or rec.get("comprune_recipe") != RECIPE_VERSION or \
            not isinstance(rec.get("config"), dict):
        raise CompruneError(f"{path} is not a comprune recipe (version {RECIPE_VERSION}): pass the recipe.json "
                            "written beside a pruned model")
    return rec


# ------------------------------------------------------------------------------------------------ card
def write_card(out_dir, manifest: dict, name: str | None = None) -> None:
    """README.md and recipe.json into `out_dir` (a model directory being written, or one already published);
    `name`: the model's (the published directory's name; default `out_dir`'s)."""
    out_dir = Path(out_dir)
    _write_text(out_dir / RECIPE, json_text(recipe(manifest), indent=2, sort_keys=True) + "\n")
    _write_text(out_dir / CARD, render(manifest, name or out_dir.name, (out_dir / "modeling_comprune.py").is_file()))


def record_evaluation(model_dir, entry: dict) -> bool:
    """Append a measurement of a pruned model (`entry`: what, its settings, its numbers) to its pruning.json's
    `evaluations`, replacing an earlier one of the same settings, and render the card again. False (nothing
    written) for a directory that is not comprune's output."""
    path = Path(model_dir) / "pruning.json"
    if not path.is_file():
        return False
    try:
        return _record(path, entry)
    except OSError as e:  # the measurement stands; only its record beside the model is missing
        print(f"note: could not record the evaluation in {path.parent} ({e.strerror or e})", file=sys.stderr)
        return False


def _record(path: Path, entry: dict) -> bool:
    manifest = json.loads(path.read_text())
    entry = {**entry, "host": entry.get("host") or host(),
             "date": entry.get("date") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    key = _identity(entry)
    manifest["evaluations"] = [e for e in manifest.get("evaluations", []) if _identity(e) != key] + [entry]
    _write_text(path, json_text(manifest, indent=2, sort_keys=True) + "\n")
    write_card(path.parent, manifest)
    return True


def _identity(entry: dict) -> tuple:
    return tuple(json.dumps(entry.get(k), sort_keys=True) for k in
                 ("by", "what", "dataset", "seqlen", "max_tokens", "tasks", "subset", "limit", "heldout", "dtype",
                  "device"))


def host() -> str:
    """One line naming the machine (the card's tables; pruning.json's entries carry the same)."""
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs, {platform.machine()}"


def _write_text(path: Path, text: str) -> None:
    """Write by rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def base_metadata(base_model: str | None) -> dict:
    """{base_model, license} of the model a prune started from, where known: comprune's embedded models, or the
    front matter of the source directory's own README.md (a Hub snapshot's, or an earlier comprune card)."""
    if not base_model:
        return {}
    if base_model.lower() in KNOWN_BASES:
        repo, licence, _ = KNOWN_BASES[base_model.lower()]
        return {"base_model": repo, "license": licence}
    src = Path(base_model)
    if src.is_dir():
        meta = front_matter((src / CARD).read_text(encoding="utf-8", errors="replace")) \
            if (src / CARD).is_file() else {}
        return {k: meta[k] for k in ("base_model", "license") if isinstance(meta.get(k), str)}
    if not src.exists() and base_model.count("/") == 1 and not base_model.startswith((".", "/")):  # a Hub id
        return {"base_model": base_model}
    return {}


def front_matter(text: str) -> dict:
    """The flat `key: value` lines of a README's YAML front matter (strings only; enough for base_model and
    license, without a YAML dependency)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    meta = {}
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if ":" in line and not line.startswith((" ", "-", "\t")):
            key, value = line.split(":", 1)
            value = value.strip()
            if value.startswith('"'):
                try:
                    value = json.loads(value)
                except ValueError:
                    continue
            if value:
                meta[key.strip()] = value
    return meta


def _yaml(meta: dict) -> str:
    """YAML front matter: strings as JSON strings (valid YAML), lists as block sequences."""
    out = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            out.append(f"{key}:")
            out += [f"- {json.dumps(str(v))}" for v in value]
        else:
            out.append(f"{key}: {json.dumps(str(value))}")
    return "\n".join(out + ["---", ""])


def render(manifest: dict, name: str = "pruned model", per_layer: bool = False) -> str:
    """The card's text. `per_layer`: the model ships modeling_comprune.py (its layers differ in shape)."""
    method = manifest.get("method", "?")
    base = manifest.get("base_model")
    meta = {**base_metadata(base)}
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation",
                 "tags": ["comprune", "pruned", "structured-pruning", method]})
    cfg = manifest.get("config") or {}
    before, after = manifest.get("params_before"), manifest.get("params_after")
    calib = manifest.get("calibration") or {}
    precision = manifest.get("precision") or {}
    lines = [_yaml(meta), f"# {name}", "",
             f"`{base or 'a model'}` pruned by comprune with **{method}**: "
             f"{_pct(manifest.get('ratio_achieved'))} of its parameters removed "
             f"(requested {_pct(manifest.get('ratio_requested'))} of {manifest.get('ratio_of', 'all')} parameters), "
             "without fine-tuning." + _source_note(base), "",
             "## Pruning", "",
             "| | |", "|---|---|",
             f"| method | {method} |",
             f"| parameters | {_int(before)} → {_int(after)} |",
             f"| ratio | requested {manifest.get('ratio_requested')}, achieved {manifest.get('ratio_achieved')} |",
             f"| decoder blocks | {len(manifest.get('kept_layers') or [])} kept, removed "
             f"{manifest.get('removed_layers') or 'none'} |",
             f"| MLP widths | {_widths(manifest.get('mlp_widths'))} |",
             f"| calibration | {calib.get('source')}, {calib.get('nsamples')} windows × {calib.get('seqlen')} tokens, "
             f"seed {calib.get('seed')} |",
             f"| calibration sha256 | `{calib.get('sha256')}` |",
             f"| computed in | {precision.get('dtype')} on {precision.get('device')}; saved as "
             f"{precision.get('saved_dtype')} |",
             f"| pruning time | {_num(manifest.get('seconds'))} s, peak RSS {_num(manifest.get('peak_rss_mb'))} MB |",
             f"| versions | {', '.join(f'{k} {v}' for k, v in (manifest.get('versions') or {}).items())} |",
             "", *_settings(cfg), ""]
    lines += _evaluations(manifest.get("evaluations") or [])
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'tok = AutoTokenizer.from_pretrained("PATH")',
              'model = AutoModelForCausalLM.from_pretrained("PATH"' + (", trust_remote_code=True)" if per_layer else ")"),
              "```", ""]
    if per_layer:
        lines += ["The layers differ in width, so the model carries `modeling_comprune.py` (stock transformers needs "
                  "`trust_remote_code=True`; `comprune.from_pretrained(PATH)` needs none) and transformers 5's "
                  "`per_layer_config` where the base config class holds it.", ""]
    lines += ["With comprune: `model, tok = comprune.from_pretrained(PATH)`; for llama.cpp: "
              "`comprune export PATH --gguf model.gguf --type q8_0`.", "",
              "## Reproduce", "", "```", command(manifest), "```", "",
              f"`{RECIPE}` holds every setting, the precision and the calibration's sha256 (which the prune "
              "checks): the same command on the same data gives the same weights.", ""]
    return "\n".join(lines)


def _source_note(base: str | None) -> str:
    known = KNOWN_BASES.get((base or "").lower())
    return f" The weights pruned were comprune's embedded `{known[2]}`, dequantised." if known else ""


def _settings(cfg: dict) -> list:
    """The settings that differ from comprune's defaults for the method (every one is in recipe.json)."""
    try:
        defaults = PruneConfig(method=cfg.get("method", "comp")).to_dict()
    except CompruneError:  # a plug-in method that is not installed here
        defaults = {}
    changed = {k: v for k, v in sorted(cfg.items()) if k != "device" and defaults.get(k, object()) != v}
    if not changed:
        return ["Settings: comprune's defaults for the method (every setting is in `recipe.json`)."]
    return ["Settings that differ from comprune's defaults (every setting is in `recipe.json`):", "",
            "| setting | value |", "|---|---|", *[f"| {k} | `{json.dumps(v)}` |" for k, v in changed.items()]]


PPL_FIELDS = ("dataset", "seqlen", "max_tokens", "windows", "tokens", "ppl", "tokens_per_second", "compiled")


def perplexity_entry(run: dict, result: dict) -> dict:
    """A perplexity result as an `evaluations` entry; `run` says who measured it (by, dtype, device)."""
    return {**run, "what": "perplexity", **{k: result[k] for k in PPL_FIELDS if k in result}}


def zeroshot_entry(run: dict, what: str, res: dict, **settings) -> dict:
    """A zero-shot result ({"tasks": {task: {"metric": m, m: value}}, "average": x}) as an `evaluations` entry."""
    tasks = res.get("tasks", {})
    return {**run, "what": what, "tasks": sorted(tasks), **settings,
            "results": {**{f"{t} {r['metric']}": r.get(r["metric"]) for t, r in tasks.items()},
                        "average": res.get("average")}}


def _evaluations(evals: list) -> list:
    if not evals:
        return ["## Evaluation", "", "Not measured yet: `comprune eval PATH` (or `comprune compare`) records its "
                "numbers here and in pruning.json.", ""]
    out = ["## Evaluation", "", "Measured by `comprune eval` / `comprune compare` on the host named, as recorded in "
           "pruning.json's `evaluations`.", ""]
    ppl = [e for e in evals if e.get("what") == "perplexity"]
    if ppl:
        out += ["| dataset | seqlen | tokens | perplexity | tokens/s | dtype | by | host | date |",
                "|---|---:|---:|---:|---:|---|---|---|---|"]
        out += [f"| {e.get('dataset')} | {e.get('seqlen')} | {e.get('tokens')} | {e.get('ppl')} | "
                f"{e.get('tokens_per_second')} | {e.get('dtype')} | {e.get('by')} | {e.get('host')} | "
                f"{e.get('date')} |" for e in ppl]
        out.append("")
    for e in evals:
        if e.get("what") == "perplexity":
            continue
        out += [f"**{e.get('what')}** ({e.get('by')}, {e.get('host')}, {e.get('date')}):", ""]
        out += [f"- {k}: {v}" for k, v in sorted((e.get("results") or {}).items())]
        out.append("")
    return out


def _pct(x) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, (int, float)) else "?"


def _int(x) -> str:
    return f"{x:,}" if isinstance(x, int) else "?"


def _num(x) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else "?"


def _widths(widths) -> str:
    if not widths:
        return "?"
    return f"{widths[0]} in every block" if len(set(widths)) == 1 else f"{min(widths)}–{max(widths)}: {widths}"
