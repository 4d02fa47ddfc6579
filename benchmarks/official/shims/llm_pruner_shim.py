"""Run horseee/LLM-Pruner's llama3.py unchanged on a local model, offline (inside its own virtualenv).

    python llm_pruner_shim.py CHECKOUT OUT_DIR -- <llama3.py arguments>

Shims (data and device only): get_examples('bookcorpus' | 'c4', ...) draws from the local C4 sample with
get_c4's own loop; from_pretrained loads float32 without device_map (a CPU run; llama3.py asks float16 for GPU);
the closing PPLMetric call, which would download WikiText-2/PTB, saves the pruned model instead (perplexity is
measured by comprune's evaluator, as for the harness rows); torch.cuda.memory_allocated returns 0 on a CPU build.
"""
from __future__ import annotations

import random
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline  # noqa: E402


def main():
    checkout, out_dir = sys.argv[1], sys.argv[2]
    rest = sys.argv[sys.argv.index("--") + 1:]
    offline.stub_datasets()
    sys.path.insert(0, checkout)
    import torch
    import transformers

    texts = offline.LocalRows(offline.c4_texts())

    def get_examples(dataset, tokenizer, n_samples, seq_len=128):
        # LLMPruner/datasets/example_samples.py:get_c4, verbatim loop, on the local sample
        tokenized_samples, history = [], []
        for _ in range(n_samples):
            while True:
                i = random.randint(0, len(texts) - 1)
                tokenized_sample = tokenizer(texts[i]["text"], return_tensors="pt")
                if tokenized_sample.input_ids.shape[1] >= seq_len and i not in history:
                    history.append(i)
                    break
            i = random.randint(0, tokenized_sample.input_ids.shape[1] - seq_len)
            tokenized_samples.append(tokenized_sample.input_ids[:, i:i + seq_len])
        return torch.cat(tokenized_samples, dim=0)

    import LLMPruner.datasets.example_samples as ex
    import LLMPruner.evaluator.ppl as ppl
    ex.get_examples = get_examples

    def save_instead_of_ppl(model, tokenizer, datasets, *args, **kwargs):
        offline.save_pruned(model, out_dir, extra={"recipe": rest})
        return {}

    ppl.PPLMetric = save_instead_of_ppl
    orig = transformers.LlamaForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, path, *args, **kwargs):
        kwargs.pop("device_map", None)
        kwargs["torch_dtype"] = torch.float32
        return orig(cls, path, *args, **kwargs)

    transformers.LlamaForCausalLM.from_pretrained = classmethod(from_pretrained)
    torch.cuda.memory_allocated = lambda *a, **k: 0
    sys.argv = [str(Path(checkout) / "llama3.py")] + rest
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
