"""Calibration text the dense model writes itself (`--calib self`, mixes): deterministic for a seed, cached with its
sha256, held-out windows from prompts apart from the calibration prompts, recorded in pruning.json."""
import json

import pytest
import torch

from conftest import byte_bpe_tokenizer, tiny_model
from comprune import selfcal
from comprune.config import PruneConfig
from comprune.data import get_calibration, mix_counts, parse_mix
from comprune.errors import CompruneError

SMALL = selfcal.Generator(max_new_tokens=12, batch_size=4)


@pytest.fixture(autouse=True)
def small_generator(monkeypatch, tmp_path):
    monkeypatch.setattr(selfcal, "DEFAULT", SMALL)  # short answers: the tests' speed, not the defaults'
    monkeypatch.setenv("COMPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def chat():
    return tiny_model(vocab=260), byte_bpe_tokenizer()


def test_deterministic_for_a_seed(chat, tmp_path, monkeypatch):
    model, tok = chat
    a = get_calibration(tok, "self", 4, 32, seed=0, model=model, progress=False)
    monkeypatch.setenv("COMPRUNE_CACHE", str(tmp_path / "other"))  # generated again, not read back
    b = get_calibration(tok, "self", 4, 32, seed=0, model=model, progress=False)
    c = get_calibration(tok, "self", 4, 32, seed=1, model=model, progress=False)
    assert a.input_ids.shape == (4, 32) and torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert a.sha256() == b.sha256() and a.describe()["self"] == b.describe()["self"]
    # the stream is the model's conversations through its chat template, answers sampled after the prompt
    text = tok.decode(a.input_ids.flatten())
    assert text.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in text


def test_cache_is_read_back_and_checked(chat, tmp_path, monkeypatch):
    model, tok = chat
    a = get_calibration(tok, "self", 4, 32, seed=0, model=model, progress=False)
    files = sorted((tmp_path / "cache" / "selfcal").rglob("batch-*.safetensors"))
    assert files
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generated although cached"))
    assert torch.equal(get_calibration(tok, "self", 4, 32, seed=0, model=model, progress=False).input_ids,
                       a.input_ids)
    monkeypatch.undo()
    monkeypatch.setattr(selfcal, "DEFAULT", SMALL)
    monkeypatch.setenv("COMPRUNE_CACHE", str(tmp_path / "cache"))
    from safetensors.torch import load_file, save_file
    t = load_file(str(files[0]))
    t["ids"][5] += 1  # its sha256 no longer matches: generated again, to the same ids
    save_file(t, str(files[0]))
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(get_calibration(tok, "self", 4, 32, seed=0, model=model, progress=False).input_ids,
                       a.input_ids)
    assert calls


def test_heldout_windows_from_prompts_apart(chat):
    model, tok = chat
    cal, held = selfcal.prompts(tok, "calibration"), selfcal.prompts(tok, "heldout")
    assert cal and held and not set(cal) & set(held)
    c = get_calibration(tok, "self", 4, 32, seed=0, model=model, heldout=2, progress=False)
    assert c.heldout.shape == (2, 32)
    rec = c.describe()["self"]
    assert rec["calibration"]["split"] == "calibration" and rec["heldout"]["split"] == "heldout"
    text = tok.decode(c.heldout.flatten())
    assert any(p in text for p in held) and not any(p in text for p in cal)


def test_mix_takes_each_source_share(chat, tmp_path):
    model, tok = chat
    src = tmp_path / "text.txt"
    src.write_text("plain words for calibration " * 200)
    mixed = get_calibration(tok, f"self:0.5,{src}:0.5", 4, 32, seed=0, model=model, heldout=2, progress=False)
    alone_self = get_calibration(tok, "self", 2, 32, seed=0, model=model, progress=False)
    alone_text = get_calibration(tok, str(src), 2, 32, seed=0)
    assert torch.equal(mixed.input_ids[:2], alone_self.input_ids)
    assert torch.equal(mixed.input_ids[2:], alone_text.input_ids)
    assert mixed.heldout.shape == (2, 32)
    assert [p["windows"] for p in mixed.describe()["parts"]] == [2, 2]


def test_mix_syntax():
    assert parse_mix("c4") == [("c4", 1.0)] and parse_mix("self") == [("self", 1.0)]
    assert parse_mix("self:1,c4:3") == [("self", 0.25), ("c4", 0.75)]
    assert parse_mix("/data/a:b.txt") == [("/data/a:b.txt", 1.0)]  # a path, not a mix
    for bad in ("self:0,c4:1", "self:0.5,self:0.5", "self,c4", "c4:-1", "self:nan,c4:1"):
        with pytest.raises(CompruneError, match="--calib"):
            parse_mix(bad)
    assert mix_counts(5, [0.5, 0.5]) == [3, 2] and sum(mix_counts(128, [0.3, 0.3, 0.4])) == 128


def test_base_model_continues_neutral_seeds(tmp_path):
    tok = byte_bpe_tokenizer(chat=False)
    model = tiny_model(vocab=260)
    c = get_calibration(tok, "self", 2, 16, seed=0, model=model, progress=False)
    assert c.describe()["self"]["calibration"]["kind"] == "base"
    assert c.input_ids[0, 0].item() == tok.bos_token_id  # BOS, then a seed such as "The"
    assert set(selfcal.prompts(tok, "calibration")) <= set(json.loads(selfcal.PROMPTS_PATH.read_text())["base_seeds"])


def test_needs_the_model_and_refuses_streaming(chat, tmp_path):
    _, tok = chat
    with pytest.raises(CompruneError, match="pass the model"):
        get_calibration(tok, "self", 2, 16, progress=False)
    from comprune.stream import _calibrate
    with pytest.raises(CompruneError, match="without --stream"):
        _calibrate(tmp_path, PruneConfig(calib="self:0.5,c4:0.5"), None, None, None, tmp_path / "p", False)


def test_prune_records_the_generator(chat):
    import comprune
    model, tok = chat
    fresh = tiny_model(vocab=260)
    _, report = comprune.prune(fresh, tok, PruneConfig(ratio=0.2, calib="self", nsamples=4, seqlen=32),
                               progress=False)
    rec = report.calibration
    assert rec["source"] == "self" and rec["self"]["calibration"]["temperature"] == 0.7
    assert len(rec["self"]["calibration"]["ids_sha256"]) == 64 and rec["sha256"]
    # the same windows as get_calibration with the dense model: the prune generated from the model before it cut
    assert rec["sha256"] == get_calibration(tok, "self", 4, 32, model=model, progress=False).sha256()


def test_cli_prune_with_a_mix(chat, tmp_path):
    from comprune.cli import main
    model, tok = chat
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("words and more words " * 300)
    assert main(["prune", str(tmp_path / "m"), "--ratio", "0.2", "--calib", f"self:0.5,{tmp_path / 't.txt'}:0.5",
                 "--nsamples", "8", "--seqlen", "32", "--out", str(tmp_path / "o"), "--json", "--dtype", "float32"]) == 0
    rec = json.loads((tmp_path / "o" / "pruning.json").read_text())["calibration"]
    assert [p["windows"] for p in rec["parts"]] == [4, 4] and rec["self"]["calibration"]["kind"] == "chat template"


def test_distill_trains_on_the_text_asked_for(tmp_path):
    """--recover-data: the source or mix drawn for the distillation's tokens in the calibration's windows (the self
    part the calibration's own stream, the next seed where the held-out windows are calibration windows), recorded;
    without it, the calibration windows."""
    import hashlib
    from comprune import prune
    from comprune.recover import DistillOptions, Recovery
    from comprune.recover.stage import distill_windows
    model, tok = tiny_model(vocab=260), byte_bpe_tokenizer()
    src = tmp_path / "text.txt"
    src.write_text("plain words for calibration " * 200)
    calib = get_calibration(tok, str(src), 8, 32, 0)
    opts = DistillOptions(tokens=6 * 32, data=f"self:0.5,{src}:0.5", eval_every=2, batch=2)
    ids = distill_windows(model, tok, calib, calib.input_ids, opts, apart=False)
    assert ids.shape == (6, 32)
    assert torch.equal(ids[:3], get_calibration(tok, "self", 3, 32, seed=0, model=model, progress=False).input_ids)
    assert not torch.equal(distill_windows(model, tok, calib, calib.input_ids, opts, apart=True)[:3], ids[:3])
    plain = DistillOptions(tokens=6 * 32)
    assert torch.equal(distill_windows(model, tok, calib, calib.input_ids, plain, apart=False), calib.input_ids[:6])
    longer = DistillOptions(tokens=4 * 64, seqlen=64)  # another window length: the calibration's source drawn anew
    assert torch.equal(distill_windows(model, tok, calib, calib.input_ids, longer, apart=False),
                       get_calibration(tok, str(src), 4, 64, 0).input_ids)
    _, report = prune(model, tok, PruneConfig(ratio=0.3, nsamples=8, seqlen=32), calibration=calib, progress=False,
                      recovery=Recovery(distill=opts, heldout=2))
    stage = report.stages[-1]
    assert stage["data"]["distill"] == opts.data and stage["options"]["data"] == opts.data
    assert stage["data_sha256"] == hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()


def test_recovery_holds_a_mix_out_apart(chat, tmp_path):
    """The stages' held-out windows of a self/mixed calibration: each part's drawn apart (self: the held-apart
    prompts), so every calibration window trains; without the dense model, the calibration's last windows."""
    from comprune.recover import heldout_ids
    model, tok = chat
    src = tmp_path / "text.txt"
    src.write_text("plain words for calibration and more words " * 200)
    mix = f"self:0.5,{src}:0.5"
    calib = get_calibration(tok, mix, 8, 32, seed=0, model=model, progress=False)
    held, what, from_calib = heldout_ids(tok, calib, 4, model)
    assert not from_calib and "apart" in what and held.shape == (4, 32)
    assert torch.equal(held, get_calibration(tok, mix, 8, 32, seed=0, heldout=4, model=model, progress=False).heldout)
    assert not any(torch.equal(h, c) for h in held for c in calib.input_ids)
    held, _, from_calib = heldout_ids(tok, calib, 4)
    assert from_calib and torch.equal(held, calib.input_ids[-4:])
