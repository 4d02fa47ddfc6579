"""Calibration windows tokenised in a child process, so the tokenizer's heap leaves with the child.

Loading a tokenizer and tokenising a text sample leaves ~30 MB of heap behind in the process that did it (more
than a block of a small model). A streamed prune asks a child for the token ids instead: same ids as
in-process tokenisation (same tokenizer, text and seed, data.get_calibration), and the child can also save the
tokenizer into the output directory.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from . import deferred
from .data import Calibration, get_calibration
from .errors import CompruneError
from .loading import remote_code_error

ERROR_PREFIX = "comprune: error: "


def calibration_in_child(model_dir: Path, cfg, data_dir=None, tokenizer_out: Path | None = None,
                         trust_remote_code: bool = False) -> Calibration:
    """The calibration windows of `cfg` (calib, nsamples, seqlen, seed) for the tokenizer of `model_dir`,
    tokenised in a child process. With `tokenizer_out`, the child also saves the tokenizer there. For the width
    search the child also draws its held-out fitness windows (Calibration.heldout), as prune() would with the
    tokenizer in hand."""
    heldout = cfg.heldout_windows
    with tempfile.TemporaryDirectory(prefix="comprune-calib-") as tmp:
        out = Path(tmp) / "ids.safetensors"
        args = [str(model_dir), cfg.calib, str(cfg.nsamples), str(cfg.seqlen), str(cfg.seed), str(data_dir or ""),
                str(out), str(tokenizer_out or ""), "1" if trust_remote_code else "", str(heldout)]
        code = "import sys; from comprune.calibration import child_main; child_main(*sys.argv[1:])"
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)  # nothing may answer a prompt
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
            msg = next((ln.removeprefix(ERROR_PREFIX) for ln in reversed(lines) if ln.startswith(ERROR_PREFIX)), None)
            raise CompruneError(msg or f"tokenising the calibration text failed: {lines[-1] if lines else r.returncode}")
        tensors = load_file(str(out))
    return Calibration(tensors["input_ids"], cfg.calib, cfg.seed, data_dir=None if data_dir is None else str(data_dir),
                       heldout=tensors.get("heldout_ids"))


def child_main(model_dir, source, nsamples, seqlen, seed, data_dir, out, tokenizer_out="", trust="", heldout="0"):
    """The child's side: tokenise, write the ids (and `heldout` fitness windows) to `out` (safetensors), save the
    tokenizer if asked."""
    try:
        tokenizer = load_tokenizer(Path(model_dir), required=True, trust_remote_code=bool(trust))
        calib = get_calibration(tokenizer, source, int(nsamples), int(seqlen), int(seed), data_dir=data_dir or None,
                                heldout=int(heldout))
    except CompruneError as e:
        print(f"{ERROR_PREFIX}{e}", file=sys.stderr)
        sys.exit(2)
    tensors = {"input_ids": calib.input_ids.contiguous()}
    if calib.heldout is not None:
        tensors["heldout_ids"] = calib.heldout.contiguous()
    save_file(tensors, out)
    if tokenizer_out:
        tokenizer.save_pretrained(tokenizer_out)


def load_tokenizer(model_dir: Path, required: bool, trust_remote_code: bool = False):
    """The tokenizer of a model directory (pad token = eos when it has none); None if absent and not required.
    Code shipped with it runs only with `trust_remote_code` (never through a prompt)."""
    try:
        tokenizer = deferred.auto_tokenizer().from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as e:
        remote = remote_code_error(e, model_dir)
        if remote is not None:
            raise remote from None
        if required:
            raise CompruneError(f"cannot load the tokenizer of {model_dir} ({e.__class__.__name__}): pass "
                                "calibration token ids or a tokenizer") from None
        return None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
