"""Calibration text the dense model writes itself (`--calib self`): what calibration sees is what survives, and
for an instruct model its own answers through its chat template are the only offline source of its style.

A chat model (its tokenizer has a chat template) answers prompts built from topics x instruction templates
(resources/self_prompts.json, never an evaluation set); a base model continues short neutral seeds after its BOS
token. Answers are sampled (temperature 0.7, seeded per batch) with the KV cache, batch by batch, and each batch's
token ids are cached under comprune's cache (safetensors, checked against their sha256 on reading), keyed by the
model, tokenizer, prompts and generator settings. Batch b is the same whatever the number of windows asked for, so
a larger calibration extends a smaller one. Every fifth topic (or seed) is held apart: the width search's fitness
windows are generated from those, never from a calibration prompt.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .errors import CompruneError
from .files import cache_dir, tensor_digest_sample

SELF = "self"
PROMPTS_PATH = Path(__file__).resolve().parent / "resources" / "self_prompts.json"
SPLITS = ("calibration", "heldout")
HELD_EVERY = 5  # every fifth topic / seed feeds the held-out windows
CACHE_VERSION = 1


@dataclass(frozen=True)
class Generator:
    """How the dense model writes: sampled, so the text varies as real text does, seeded so it is reproducible."""
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 192
    batch_size: int = 16


DEFAULT = Generator()

def _prompt_data() -> dict:
    return json.loads(PROMPTS_PATH.read_text())


def is_chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompts(tokenizer, split: str) -> list[str]:
    """The prompts of `split`: topics x templates for a chat model, the neutral seeds for a base model."""
    data = _prompt_data()
    held = split == "heldout"
    if is_chat(tokenizer):
        topics = [t for i, t in enumerate(data["topics"]) if (i % HELD_EVERY == HELD_EVERY - 1) == held]
        return [tpl.format(t=t) for t in topics for tpl in data["templates"]]
    return [s for i, s in enumerate(data["base_seeds"]) if (i % HELD_EVERY == HELD_EVERY - 1) == held]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The tokens the model continues: the chat template's user turn and generation prompt, or BOS + the seed."""
    if is_chat(tokenizer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    return bos + list(tokenizer(prompt, add_special_tokens=False).input_ids)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _ids_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


class SelfText:
    """The dense model's own text for one split, generated batch by batch (cached) until enough tokens."""

    def __init__(self, model, tokenizer, seed: int = 0, split: str = "calibration", gen: Generator | None = None,
                 cache: Path | None = None, progress: bool = True):
        gen = gen or DEFAULT
        if split not in SPLITS:
            raise CompruneError(f"unknown self-calibration split '{split}': use one of {', '.join(SPLITS)}")
        self.model, self.tokenizer, self.seed, self.split, self.gen = model, tokenizer, seed, split, gen
        self.progress = progress
        self.prompts = prompts(tokenizer, split)
        if not self.prompts:
            raise CompruneError(f"{PROMPTS_PATH} has no {split} prompts: restore the file")
        random.Random(f"{SELF}:{seed}:{split}").shuffle(self.prompts)
        dtype = next(model.parameters()).dtype
        self.identity = {
            "version": CACHE_VERSION, "model": tensor_digest_sample(model.state_dict().items()),
            "dtype": str(dtype).removeprefix("torch."), "device": next(model.parameters()).device.type,
            "tokenizer": _sha([len(tokenizer), getattr(tokenizer, "chat_template", None) or "",
                               _eos_ids(model, tokenizer)]),
            "prompts": hashlib.sha256(PROMPTS_PATH.read_bytes()).hexdigest(), "generator": asdict(gen),
            "seed": seed, "split": split}
        self.dir = (cache if cache is not None else cache_dir() / "selfcal") / _sha(self.identity)[:20]
        self.batches: list[list[torch.Tensor]] = []

    def stream(self, n_tokens: int) -> torch.Tensor:
        """At least `n_tokens` tokens (the first n of any longer stream): whole conversations, joined."""
        have = sum(int(t.numel()) for b in self.batches for t in b)
        bar = tqdm(total=n_tokens, initial=min(have, n_tokens), desc=f"self-calibration ({self.split})",
                   disable=not self.progress, dynamic_ncols=True, leave=False, file=sys.stderr)
        while have < n_tokens:
            batch = self._batch(len(self.batches))
            self.batches.append(batch)
            got = sum(int(t.numel()) for t in batch)
            bar.update(min(got, n_tokens - have))
            have += got
        bar.close()
        return torch.cat([t for b in self.batches for t in b])[:n_tokens]

    def record(self) -> dict:
        convs = [t for b in self.batches for t in b]
        ids = torch.cat(convs) if convs else torch.zeros(0, dtype=torch.long)
        return {"generator": "the dense model", "kind": "chat template" if is_chat(self.tokenizer) else "base",
                **asdict(self.gen), "seed": self.seed, "split": self.split, "prompts_file": PROMPTS_PATH.name,
                "prompts_sha256": self.identity["prompts"], "model_digest": self.identity["model"],
                "dtype": self.identity["dtype"], "conversations": len(convs), "tokens": int(ids.numel()),
                "ids_sha256": _ids_sha256(ids)}

    # ------------------------------------------------------------------------------------------ one batch
    def _batch(self, b: int) -> list[torch.Tensor]:
        path = self.dir / f"batch-{b:05d}.safetensors"
        cached = self._read(path)
        if cached is not None:
            return cached
        convs = self._generate(b)
        self._write(path, convs)
        return convs

    def _generate(self, b: int) -> list[torch.Tensor]:
        n = self.gen.batch_size
        batch = [self.prompts[(b * n + j) % len(self.prompts)] for j in range(n)]
        ids = [prompt_ids(self.tokenizer, p) for p in batch]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        eos = _eos_ids(self.model, self.tokenizer)
        seed = int(_sha([self.seed, self.split, b])[:15], 16)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
            torch.manual_seed(seed)
            out = self.model.generate(input_ids, attention_mask=mask, do_sample=True, temperature=self.gen.temperature,
                                      top_p=self.gen.top_p, top_k=0, max_new_tokens=self.gen.max_new_tokens,
                                      pad_token_id=pad, eos_token_id=eos or None)
        convs = []
        for x, row in zip(ids, out[:, width:].cpu()):
            ends = [k for k, t in enumerate(row.tolist()) if t in eos]
            answer = row[:ends[0] + 1] if ends else row  # up to and with the end of the turn
            convs.append(torch.cat([torch.tensor(x, dtype=torch.long), answer.long()]))
        return convs

    def _read(self, path: Path) -> list[torch.Tensor] | None:
        if not path.is_file():
            return None
        try:
            t = load_file(str(path))
            ids, lengths = t["ids"], t["lengths"]
            sha = t["sha256"]
        except Exception:  # noqa: BLE001 - a damaged or foreign file (safetensors raises its own error types)
            return None  # generated again
        if bytes(sha.tolist()).decode(errors="replace") != _ids_sha256(ids) or int(lengths.sum()) != ids.numel():
            return None
        return list(torch.split(ids, lengths.tolist()))

    def _write(self, path: Path, convs: list[torch.Tensor]):
        ids = torch.cat(convs)
        tensors = {"ids": ids, "lengths": torch.tensor([len(c) for c in convs], dtype=torch.long),
                   "sha256": torch.tensor(list(_ids_sha256(ids).encode()), dtype=torch.uint8)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "identity.json").write_text(json.dumps(self.identity, indent=1) + "\n")
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            save_file(tensors, tmp)
            os.replace(tmp, path)
        except OSError as e:  # an unwritable cache costs a regeneration next time, never the prune
            print(f"comprune: note: self-calibration cache not written ({e.strerror or e})", file=sys.stderr)


def self_windows(model, tokenizer, nsamples: int, seqlen: int, seed: int, heldout: int = 0,
                 gen: Generator | None = None, cache: Path | None = None, progress: bool = True):
    """(nsamples x seqlen calibration windows, heldout x seqlen windows from the held-apart prompts or None, the
    record for pruning.json): consecutive windows of the model's own conversations, joined."""
    if model is None:
        raise CompruneError("--calib self generates text with the dense model: pass the model (comprune.prune and "
                            "`comprune prune` do; a streamed prune cannot, prune without --stream)")
    calib = SelfText(model, tokenizer, seed, "calibration", gen, cache, progress)
    windows = calib.stream(nsamples * seqlen).view(nsamples, seqlen)
    record = {"calibration": calib.record()}
    held = None
    if heldout:
        text = SelfText(model, tokenizer, seed, "heldout", gen, cache, progress)
        held = text.stream(heldout * seqlen).view(heldout, seqlen)
        record["heldout"] = text.record()
    return windows, held, record
