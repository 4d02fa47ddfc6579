"""A streamed prune equals the in-memory one when the model computes in bfloat16 from a float32 source (what
--dtype auto chooses on a BF16 host), for every family that streams: every tensor the prune changed is the same,
and every tensor it did not change (embeddings, norms, the LM head, blocks a method left alone) is written as the
source holds it, in both paths."""
from __future__ import annotations

import pytest
import torch

from comprune import PruneConfig, load, prune, prune_streaming, save_pretrained
from conftest import FAMILIES, OTHER_FAMILIES, tiny_model
from test_moe import MOE_FAMILIES, tiny_moe
from test_stream import _sharded, _weights
from test_stream import calib as stream_calib

STREAMING = [f for f in FAMILIES + OTHER_FAMILIES if f != "phi3"] + MOE_FAMILIES  # phi3: fused, refused


@pytest.mark.parametrize("fam", STREAMING)
def test_bf16_stream_equals_in_memory_and_keeps_the_source(fam, tmp_path):
    model = tiny_moe(fam, layers=3) if fam in MOE_FAMILIES else tiny_model(fam, layers=4)
    src = _sharded(tmp_path / "src", model)
    cfg = dict(ratio=0.3, ratio_of="blocks", layer_share=0.4, batch_size=4)
    mem, tok = load(src, dtype="bfloat16")
    mem, report = prune(mem, tok, PruneConfig(**cfg), calibration=stream_calib(), progress=False)
    save_pretrained(mem, tok, tmp_path / "mem", report)
    prune_streaming(src, tmp_path / "stream", PruneConfig(**cfg), calibration=stream_calib(), progress=False,
                    dtype="bfloat16")
    a, b, source = _weights(tmp_path / "stream"), _weights(tmp_path / "mem"), _weights(src)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{fam}: streamed and in-memory differ in {differ[:4]}"
    outside = [k for k in a if ".layers." not in k]
    assert outside and all(torch.equal(a[k], source[k]) for k in outside if k in source), fam
