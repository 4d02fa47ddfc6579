"""The model card and the recipe beside every pruned model: Hub metadata that parses as YAML, numbers that are
the run's own (pruning.json's), and a recipe that prunes the same bytes again with one command."""
import json

import pytest
import yaml

from comprune.card import CARD, RECIPE, front_matter, read_recipe, record_evaluation, render
from comprune.errors import CompruneError
from _reliability import calib_text, main, prune_args, same_weights, tiny_dir


def card_meta(model_dir):
    text = (model_dir / CARD).read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    src, text = tiny_dir(tmp / "src"), calib_text(tmp / "calib.txt")
    (src / CARD).write_text('---\nlicense: "apache-2.0"\nbase_model: org/tiny-base\ntags:\n- x\n---\n# tiny\n')
    return src, text, tmp / "out"


def test_card_metadata_and_numbers_come_from_the_run_and_the_recipe_reprunes_the_same_bytes(pruned, capsys):
    src, text, out = pruned
    code, err = main(prune_args(src, out, text, "--width-allocation", "adaptive"), capsys)
    assert code == 0, err
    man = json.loads((out / "pruning.json").read_text())
    meta, card = card_meta(out)
    # Hub metadata: the licence and base model inherited from the source's own card, comprune's tags
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "org/tiny-base"
    assert meta["library_name"] == "transformers" and {"comprune", "pruned", "comp"} <= set(meta["tags"])
    # every number the card states is pruning.json's
    assert f"{man['params_before']:,} → {man['params_after']:,}" in card
    assert f"achieved {man['ratio_achieved']}" in card and man["calibration"]["sha256"] in card
    assert f"| nsamples | `{man['config']['nsamples']}` |" in card and "| ratio |" in card  # settings changed
    assert "| seed |" not in card and "trust_remote_code=True" in card  # a default left out; per-layer widths
    assert "Not measured yet" in card
    # the recipe: the run's model, settings and precision; the printed command prunes the same bytes again
    recipe = read_recipe(out)
    assert recipe["model"] == str(src) and recipe["config"] == man["config"]
    assert recipe["dtype"] == man["precision"]["dtype"] and recipe["save_dtype"] == man["precision"]["saved_dtype"]
    assert f"--recipe {RECIPE} --out OUT" in card
    again = out.parent / "again"
    code, err = main(["prune", "--recipe", out / RECIPE, "--calib", text, "--out", again, "--json"], capsys)
    assert code == 0, err
    assert same_weights(out, again)
    assert (out / "config.json").read_bytes() == (again / "config.json").read_bytes()
    strip = ("seconds", "peak_rss_mb", "precision")  # the precision record says how it was chosen: auto, or given
    man2 = json.loads((again / "pruning.json").read_text())
    assert {k: v for k, v in man2.items() if k not in strip} == {k: v for k, v in man.items() if k not in strip}
    assert man2["precision"]["dtype"] == man["precision"]["dtype"]
    # other calibration data would prune another model: refused before any work
    other = calib_text(out.parent / "other.txt", words=1500)
    code, err = main(["prune", "--recipe", out, "--calib", other, "--out", out.parent / "x"], capsys)
    assert code == 2 and "calibration data differs" in err and not (out.parent / "x").exists()


def test_eval_records_its_numbers_in_pruning_json_and_the_card(pruned, capsys):
    src, text, out = pruned
    if not (out / "pruning.json").is_file():
        code, err = main(prune_args(src, out, text), capsys)
        assert code == 0, err
    code, err = main(["eval", out, "--ppl", text, "--seqlen", "16,32", "--max-tokens", "256", "--json"], capsys)
    assert code == 0, err
    man = json.loads((out / "pruning.json").read_text())
    evals = [e for e in man["evaluations"] if e["what"] == "perplexity"]
    assert [e["seqlen"] for e in evals] == [16, 32] and all(e["by"] == "comprune eval" for e in evals)
    _, card = card_meta(out)
    for e in evals:  # the card's row of each measurement holds exactly the recorded numbers
        assert f"| {e['dataset']} | {e['seqlen']} | {e['tokens']} | {e['ppl']} | {e['tokens_per_second']} |" in card
    # measured again with the same settings: replaced, not appended
    code, err = main(["eval", out, "--ppl", text, "--seqlen", "16", "--max-tokens", "256", "--json"], capsys)
    assert code == 0, err
    assert len(json.loads((out / "pruning.json").read_text())["evaluations"]) == 2
    assert card_meta(out)[0]["license"] == "apache-2.0"  # the metadata survives a re-render


def test_streamed_prune_writes_card_and_recipe(tmp_path, capsys):
    src, text = tiny_dir(tmp_path / "src"), calib_text(tmp_path / "calib.txt")
    code, err = main(prune_args(src, tmp_path / "s", text, "--stream"), capsys)
    assert code == 0, err
    meta, card = card_meta(tmp_path / "s")
    assert "license" not in meta and meta["tags"][0] == "comprune"  # nothing known of the base: no licence claimed
    assert read_recipe(tmp_path / "s")["stream"] is True
    code, err = main(["prune", "--recipe", tmp_path / "s", "--calib", text, "--out", tmp_path / "s2"], capsys)
    assert code == 0, err
    assert same_weights(tmp_path / "s", tmp_path / "s2")
    other = calib_text(tmp_path / "other.txt", words=1500)  # streamed: the digest is known after the prune only
    code, err = main(["prune", "--recipe", tmp_path / "s", "--calib", other, "--out", tmp_path / "s3"], capsys)
    assert code == 0 and "calibration data differs from the recipe's" in err


def test_known_bases_front_matter_and_bad_recipes(tmp_path):
    meta = yaml.safe_load(render({"method": "comp", "base_model": "smollm2"}).split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert front_matter('---\nlicense: mit\nbase_model: "a/b"\n---\n') == {"license": "mit", "base_model": "a/b"}
    assert record_evaluation(tmp_path, {"what": "perplexity"}) is False  # not comprune's output: nothing written
    assert not any(tmp_path.iterdir())
    (tmp_path / "r.json").write_text('{"config": {}}')
    for bad in (tmp_path / "r.json", tmp_path / "missing.json"):
        with pytest.raises(CompruneError, match="recipe"):
            read_recipe(bad)


def test_compare_measurements_are_recorded_as_measured(pruned, capsys):
    from comprune.compare.records import card_entries
    src, text, out = pruned
    if not (out / "pruning.json").is_file():
        code, err = main(prune_args(src, out, text), capsys)
        assert code == 0, err
    rec = {"ppl": {"ppl32": {"dataset": "wikitext2", "seqlen": 32, "max_tokens": 1024, "windows": 32, "tokens": 1024,
                             "ppl": 41.25, "tokens_per_second": 900.5}},
           "speed": {"relative": 1.31, "tokens_per_second": 55.0, "dense_tokens_per_second": 42.0, "note": "x"},
           "zeroshot": {"tasks": {"piqa": {"metric": "acc", "acc": 0.61}}, "average": None, "subset": 200}}
    for stage in ("ppl", "speed", "zeroshot"):
        for entry in card_entries(stage, rec, "float32"):
            assert record_evaluation(out, entry)
    evals = json.loads((out / "pruning.json").read_text())["evaluations"]
    by_what = {e["what"]: e for e in evals if e["by"] == "comprune compare"}
    assert by_what["perplexity"]["ppl"] == 41.25
    assert by_what["generation speed (transformers)"]["results"] == {"relative": 1.31, "tokens_per_second": 55.0,
                                                                     "dense_tokens_per_second": 42.0}
    assert by_what["zeroshot"]["results"] == {"piqa acc": 0.61, "average": None}
    _, card = card_meta(out)
    assert "| wikitext2 | 32 | 1024 | 41.25 | 900.5 | float32 | comprune compare |" in card
    assert "- relative: 1.31" in card and "- piqa acc: 0.61" in card
