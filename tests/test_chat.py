"""The chat measure: exact-answer hits and KL(dense ‖ pruned) on the dense model's greedy answers, through the
chat template; deterministic, its prompts apart from every calibration source, in eval and compare."""
import json

import pytest
import torch

from conftest import byte_bpe_tokenizer, tiny_model
from comprune.evaluate import chat
from comprune.evaluate.chat import chat_items, chat_measure, chat_reference, greedy, is_hit


@pytest.fixture(scope="module")
def dense():
    return tiny_model(vocab=260), byte_bpe_tokenizer()


@pytest.fixture(autouse=True)
def short(monkeypatch):
    # the tests' speed, not the measure's lengths: one batch, a few tokens
    monkeypatch.setattr(chat, "ANSWER_TOKENS", 4)
    monkeypatch.setattr(chat, "QUESTION_TOKENS", 4)
    monkeypatch.setattr(chat, "BATCH", 64)


def test_hit_rule():
    assert is_hit("The capital of France is Paris.", ["paris"])
    assert is_hit("Eight legs. A spider is an arachnid.", ["8", "eight"])
    assert is_hit("8 times 8 equals sixty-four", ["64", "sixty-four"])
    assert not is_hit("It is Lyon. Paris is the largest city.", ["paris"])  # only the first sentence counts
    assert not is_hit("9 minus 4 is 4.5", ["5", "five"])  # a number is compared whole
    assert not is_hit("Parisian food is good", ["paris"])  # whole words
    assert not is_hit("", ["paris"])
    assert is_hit("Water boils at 100.00 degrees Celsius.", ["100"])  # a number by its value
    assert is_hit("A kilometre is 1,000 metres.", ["1000"]) and not is_hit("It is 1000.5 metres.", ["1000"])


def test_prompt_set_halves_and_apart_from_calibration():
    from comprune.selfcal import PROMPTS_PATH
    held_p, held_q = chat_items("heldout")
    test_p, test_q = chat_items("test")
    assert 60 <= len(held_q) + len(test_q) <= 100 and abs(len(held_q) - len(test_q)) <= 1
    assert not {q["question"] for q in held_q} & {q["question"] for q in test_q} and not set(held_p) & set(test_p)
    for q in held_q + test_q:
        assert q["answers"] and not is_hit(q["question"], q["answers"])  # the question does not give the answer
    cal = json.loads(PROMPTS_PATH.read_text())
    evaluation = " ".join(held_p + test_p + [q["question"] for q in held_q + test_q]).lower()
    for topic in cal["topics"]:
        assert topic.lower() not in evaluation
    calibration = " ".join(cal["topics"] + cal["templates"]).lower()
    for text in held_p + test_p + [q["question"] for q in held_q + test_q]:
        assert text.lower().rstrip("?.") not in calibration
    with pytest.raises(Exception, match="split"):
        chat_items("train")


def test_greedy_is_deterministic_and_batch_independent(dense):
    model, tok = dense
    prompts = chat_items("test")[0][:5]
    a = greedy(model, tok, prompts, 6)
    assert a == greedy(model, tok, prompts, 6)
    assert a == greedy(model, tok, prompts, 6, batch_size=2)  # left padding changes no answer
    # through the chat template: the first answer continues the prompt exactly as uncached argmax steps would
    ids = torch.tensor([chat.render(tok, prompts[0])])
    assert ids[0, 0].item() == tok.bos_token_id
    seq = ids
    for _ in range(len(a[0])):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert seq[0, ids.shape[1]:].tolist() == a[0]


def test_kl_is_zero_for_the_dense_model_and_positive_when_pruned(dense):
    import comprune
    from conftest import calib
    model, tok = dense
    ref = chat_reference(model, tok, "test")
    same = chat_measure(model, tok, ref, "test")
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["kl_tokens"] == sum(len(a) for a in ref.answer_ids)
    assert same["questions"] == len(chat_items("test")[1]) and len(same["replies"]) == same["questions"]
    pruned = tiny_model(vocab=260)
    comprune.prune(pruned, tok, comprune.PruneConfig(ratio=0.3), calibration=calib(vocab=260), progress=False)
    cut = chat_measure(pruned, tok, ref, "test")
    assert cut["kl"] > 1e-4
    with pytest.raises(Exception, match="half"):
        chat_measure(pruned, tok, ref, "heldout")


def test_eval_cli_chat_uses_the_base_model_as_reference(dense, tmp_path, capsys):
    import comprune
    from comprune.cli import main
    from conftest import calib
    model, tok = dense
    base = tmp_path / "dense"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    pruned = tiny_model(vocab=260)
    _, report = comprune.prune(pruned, tok, comprune.PruneConfig(ratio=0.3), calibration=calib(vocab=260),
                               progress=False, base_model=str(base))
    comprune.save_pretrained(pruned, tok, tmp_path / "pruned", report)
    assert main(["eval", str(tmp_path / "pruned"), "--chat", "--chat-split", "heldout", "--json",
                 "--dtype", "float32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chat"]["reference"] == str(base) and out["chat"]["kl"] > 0 and out["chat"]["split"] == "heldout"
    assert out["perplexity"] == []  # --chat alone measures only the chat
    evals = json.loads((tmp_path / "pruned" / "pruning.json").read_text())["evaluations"]
    assert [e["results"]["exact-answer hits"] for e in evals if e["what"] == "chat"] == \
        [f"{out['chat']['hits']}/{out['chat']['questions']}"]


def test_compare_chat_stage_and_column(dense, tmp_path):
    from comprune.compare import Comparison
    from comprune.compare.report import markdown_table, rows
    model, tok = dense
    d = tmp_path / "dense"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    cmp = Comparison(str(d), [0.2], ["comp"], tmp_path / "cmp", progress=False, dtype="float32")
    assert ("dense", "chat") in cmp.plan() and ("comp-r0.20", "chat") in cmp.plan()
    cmp.step("dense", "chat")
    rec = json.loads((tmp_path / "cmp" / "runs" / "dense.json").read_text())
    assert rec["chat"]["kl"] == pytest.approx(0.0, abs=1e-6) and rec["chat"]["questions"] > 0
    r = rows(tmp_path / "cmp", cmp.settings())
    assert r[0]["chat_hits"] == rec["chat"]["hits"]
    table = markdown_table(r, cmp.settings())
    assert "chat hits / KL" in table and f"{rec['chat']['hits']}/{rec['chat']['questions']} / 0.000" in table
