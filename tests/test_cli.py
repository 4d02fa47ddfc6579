import json
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "comprune.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["eval", "no-such-model"], "unknown model"),
    (["eval", "/nonexistent/x.gguf"], "not found"),
])
def test_cli_errors_are_one_line(args, needle):
    r = run(*args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_eval_json_on_tiny_model(tmp_path):
    from conftest import tiny_model
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tk = Tokenizer(models.WordLevel({chr(97 + i): i for i in range(26)} | {"[UNK]": 26}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(tmp_path / "m")
    r = run("eval", str(tmp_path / "m"), "--seqlen", "32", "--max-tokens", "256", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"model", "dataset", "seqlen", "max_tokens", "windows", "ppl", "tokens", "seconds"} <= set(out)
    assert out["windows"] == 8 and out["ppl"] > 1
    r = run("eval", str(tmp_path / "m"), "--seqlen", "1")
    assert r.returncode == 2 and "seqlen" in r.stderr
