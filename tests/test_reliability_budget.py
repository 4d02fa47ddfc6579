"""Reliability matrix, part 4: budgets in speed, late refusals and machine-readable output.

A latency cache that is corrupt or incomplete is measured again; a speed target on a family llama.cpp cannot run
is refused before any work; no file comprune writes holds NaN or Infinity (strict JSON readers refuse them);
with --json every exit prints one JSON object on stdout; an input too short for what is asked of it is refused
before the walk. Reliability audit (docs/reliability.md) items 2-6 of the second pass."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from _reliability import calib_text, tiny_dir

NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def strict_loads(text: str):
    """A strict JSON parser: NaN, Infinity and -Infinity are errors."""
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    return tiny_dir(root / "tiny"), calib_text(root / "calib.txt")


# ------------------------------------------------------------------------------ strict JSON in every file (4)
def _manifest(tmp_path, obj):
    from comprune.io import write_manifest
    write_manifest(tmp_path / "pruning.json", obj)
    return (tmp_path / "pruning.json").read_text()


def _records(tmp_path, obj):
    from comprune.compare.records import write_json
    write_json(tmp_path / "run.json", obj)
    return (tmp_path / "run.json").read_text()


def _latency(tmp_path, obj):
    from comprune.outputs import json_text
    return json_text(obj, indent=1)


def _report(tmp_path, obj):
    """A PruneReport's detail through save_pretrained's manifest."""
    from comprune.io import write_manifest
    from comprune.prune import PruneReport
    report = PruneReport("comp", 0.3, 0.3, 10, 7, [], [0], [4], 0.0, 0.0, {}, {}, {}, layer_scores=[math.nan],
                         details=obj)
    write_manifest(tmp_path / "pruning.json", report.to_dict())
    return (tmp_path / "pruning.json").read_text()


@pytest.mark.parametrize("writer", [_manifest, _records, _latency, _report])
def test_no_nan_or_infinity_in_json_files(tmp_path, writer):
    obj = {"score": NONFINITE["nan"], "ppl": NONFINITE["inf"], "nested": [1.5, NONFINITE["-inf"], (2, 3)],
           "ok": 0.25}
    got = strict_loads(writer(tmp_path, obj))
    if writer is _report:
        assert got["layer_scores"] == [None]
        got = got["details"]
    assert got["score"] is None and got["ppl"] is None and got["nested"] == [1.5, None, [2, 3]], got
    assert got["ok"] == 0.25


def test_finite_json_files_are_byte_identical(tmp_path):
    obj = {"b": [1.0, 2, (3, 4)], "a": {"x": 1e-30, "y": "z"}, "c": None, "d": True}
    assert _manifest(tmp_path, obj) == json.dumps(obj, indent=2, sort_keys=True) + "\n"
    assert _records(tmp_path, obj) == json.dumps(obj, indent=2, sort_keys=True) + "\n"


def test_resume_files_keep_non_finite_values_exactly(tmp_path):
    """A checkpoint and the search's state are strict JSON too, and a resume reads back the very values."""
    import importlib.util
    from types import SimpleNamespace
    from comprune.checkpoint import STATE, Checkpoint
    ckpt = Checkpoint(tmp_path / "ckpt", "f")
    ckpt.save(1, None, {"plan": {"costs": [0.5, NONFINITE["inf"]], "score": NONFINITE["nan"]}, "blocks": {}})
    strict_loads((tmp_path / "ckpt" / STATE).read_text())
    _, _, details = ckpt.load(None)
    assert details["plan"]["costs"] == [0.5, math.inf] and math.isnan(details["plan"]["score"])

    import comprune.methods.search as search
    spec = importlib.util.spec_from_file_location("optimiser", Path(search.__file__).parent / "optimiser.py")
    opt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(opt)

    class Fitness:  # every allocation scores inf: the parent never changes and its fitness is saved as it is
        removed_level, windows = 3, [0, 1]

        def population(self, kids, windows=None, parent=None, record=False):
            fits = [math.inf] * len(kids)
            return (fits, [None] * len(kids)) if record else fits
    cfg = SimpleNamespace(seed=0, search_time=0, search_generations=2, search_offspring=2, search_filter=1,
                          search_survivors=1)
    state = tmp_path / "search.json"
    _, trace = opt.evolve(Fitness(), {0: 1, 1: 1}, 2, cfg, state, show=False)
    strict_loads(state.read_text())
    cfg.search_generations = 3
    _, resumed = opt.evolve(Fitness(), {0: 1, 1: 1}, 2, cfg, state, show=False)
    assert resumed[:3] == trace == [[0, math.inf], [1, math.inf], [2, math.inf]]
