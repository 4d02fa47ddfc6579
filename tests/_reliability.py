"""Shared builders for the reliability matrix (tests/test_reliability_*.py): tiny models and files, the CLI run
in-process or in forked children with faults (tests/_fault_driver.py), and the "one clean line" check."""
from __future__ import annotations

import atexit
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
DRIVER = HERE / "_fault_driver.py"
SMALL = ["--nsamples", "4", "--seqlen", "32"]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel({chr(32 + i): i for i in range(95)} | {"[UNK]": 95}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[UNK]")


def tiny_dir(path: Path, seed: int = 0, layers: int = 4, tokenizer: bool = True, **save_kw) -> Path:
    """A tiny random Llama (hidden 64, `layers` blocks, vocab 256) with a character tokenizer, saved."""
    from conftest import tiny_model
    path = Path(path)
    tiny_model("llama", seed=seed, layers=layers).save_pretrained(path, **save_kw)
    if tokenizer:
        word_tokenizer().save_pretrained(path)
    return path


def calib_text(path: Path, words: int = 1000) -> Path:
    rng = random.Random(0)
    Path(path).write_text(" ".join("".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(2, 9)))
                                   for _ in range(words)))
    return Path(path)


def prune_args(src, out, text, *extra) -> list[str]:
    return ["prune", str(src), "--ratio", "0.3", "--layer-share", "0.5", *SMALL, "--calib", str(text),
            "--out", str(out), "--json", *extra]


def cli(*args, env=None, stdin: str | None = "", cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter (for stdin, exit codes and imports); slower (~5 s) than `main`."""
    return subprocess.run([sys.executable, "-m", "comprune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, input=stdin, cwd=cwd, env={**os.environ, **(env or {})})


def main(argv, capsys) -> tuple[int, str]:
    """The CLI in this process: (exit code, stderr). An escaping exception is a failure (a traceback). A
    streamed prune's calibration child is a fork of this process (tests/_forked_calibration.py)."""
    from comprune.cli import main as cli_main
    from _forked_calibration import forked_calibration
    capsys.readouterr()
    try:
        with forked_calibration():
            code = cli_main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    except BaseException as e:  # noqa: BLE001
        raise AssertionError(f"traceback instead of a clean error: {e.__class__.__name__}: {e}") from e
    return code, capsys.readouterr().err


def jobs(specs: list[dict], tmp_path: Path, timeout=600, together: bool = False) -> list[dict]:
    """Run CLI jobs in forked children of one interpreter that lives for the whole test session (see
    _fault_driver.py): well under a second each instead of ~6 s of imports per fresh interpreter. Each job
    starts from this process's current environment and directory, as a subprocess would; `together` runs
    them all at once (concurrent processes)."""
    spec = tmp_path / f"jobs-{os.getpid()}-{random.random():.9f}.json"
    spec.write_text(json.dumps({"jobs": [{**s, "argv": [str(a) for a in s["argv"]]} for s in specs],
                                "environ": dict(os.environ), "cwd": os.getcwd(), "together": together}))
    driver = _driver()
    driver.stdin.write(f"{spec}\n")
    driver.stdin.flush()
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([driver.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = driver.stdout.readline() if ready else ""
        if not line:
            _stop_driver()
            raise AssertionError(f"fault driver {'timed out' if not ready else 'died'}: "
                                 f"{_DRIVER_LOG.read_text()[-3000:] if _DRIVER_LOG else ''}")
        if line.strip() == f"done {spec}":
            break
    out = Path(f"{spec}.out")
    results = json.loads(out.read_text())
    spec.unlink()
    out.unlink()
    return results


_DRIVER = None
_DRIVER_LOG = None


def _driver() -> subprocess.Popen:
    global _DRIVER, _DRIVER_LOG
    if _DRIVER is None or _DRIVER.poll() is not None:
        _DRIVER_LOG = Path(tempfile.mkstemp(prefix="comprune-fault-driver-", suffix=".log")[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        _DRIVER = subprocess.Popen([sys.executable, str(DRIVER), "--serve"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=open(_DRIVER_LOG, "w"), text=True, env=env)
        atexit.register(_stop_driver)
    return _DRIVER


def _stop_driver():
    global _DRIVER
    if _DRIVER is not None:
        try:
            _DRIVER.stdin.close()
            _DRIVER.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            _DRIVER.kill()
        _DRIVER = None
        if _DRIVER_LOG is not None:
            _DRIVER_LOG.unlink(missing_ok=True)


def assert_clean_error(code, stderr, *needles):
    """Exit 2 with exactly one line `comprune: error: ...` containing every needle (case-insensitive)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and not _progress(ln)]
    assert code == 2, f"exit {code}, expected 2; stderr tail: {stderr[-1500:]}"
    assert "Traceback" not in stderr, stderr[-1500:]
    assert len(lines) == 1 and lines[0].startswith("comprune: error: "), lines[-5:]
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


def _progress(line: str) -> bool:
    """tqdm bars and comprune's own progress lines are not error output."""
    return "it/s]" in line or "s/it]" in line or line.startswith("[comprune]") or "%|" in line


def siblings(out: Path) -> set[str]:
    """Everything beside `out` that a run could have left (hidden names derived from out's name)."""
    out = Path(out)
    return {p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") or p.name == out.name}


def weights(d: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def strip_manifest(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("seconds", "peak_rss_mb", "streaming")}


def export_ready(d: Path, layers: int = 4) -> Path:
    """A tiny llama (vocab 300) with a byte-level BPE tokenizer: GGUF export needs one."""
    from conftest import tiny_model
    from test_gguf import save_tokenizer
    d = Path(d)
    tiny_model("llama", layers=layers, vocab=300).save_pretrained(d)
    save_tokenizer(d)
    return d
