"""Run icip-cas/ShortGPT (shortgpt/shortgpt.py: ShortGPT.eval_importance, remove_layers) on a local model,
offline, CPU: shortgpt/run_shortgpt.py's loop with the local C4 sample in place of PG-19.

    python shortgpt_shim.py CHECKOUT OUT_DIR N_PRUNE MAX_DOCS SEED

Shims: the model loads in float32 without device_map; `.to("cuda")` on the inputs stays on the CPU; documents
come from the C4 sample, shuffled by a seeded DataLoader (run_shortgpt.py shuffles PG-19 validation unseeded),
`MAX_DOCS` of them (PG-19 validation is ~50 books; the whole C4 sample would be 0.5 M tokens on this CPU).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline  # noqa: E402


def main():
    checkout, out_dir, n_prune, max_docs, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    offline.stub_datasets()
    sys.path.insert(0, str(Path(checkout) / "shortgpt"))
    import torch
    import transformers
    from torch.utils.data import DataLoader

    orig = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, path, *args, **kwargs):
        kwargs.pop("device_map", None)
        kwargs["torch_dtype"] = torch.float32
        return orig(cls, path, *args, **kwargs)

    transformers.AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)
    to = torch.Tensor.to
    torch.Tensor.to = lambda self, *a, **k: to(self, *("cpu" if x == "cuda" else x for x in a), **k)
    from shortgpt import ShortGPT

    torch.manual_seed(seed)
    data = [{"text": t} for t in offline.c4_texts()]
    dataloader = DataLoader(data, batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(seed))
    short_model = ShortGPT(model_name=sys.argv[6], layers_path="model.layers", n_prune_layers=n_prune)
    short_model.model.eval()
    for k, batch in enumerate(dataloader):
        if k >= max_docs:
            break
        short_model.eval_importance(prompts=batch['text'], stride=256, max_gen_len=0)
    prune_order = [i for i, _ in sorted(enumerate(short_model.importances), key=lambda x: x[1])]
    print("Pruning order:", ', '.join(str(i) for i in prune_order), flush=True)
    removed = short_model.remove_layers()
    for layer_idx, module in enumerate(short_model.layers):
        module.self_attn.layer_idx = layer_idx
    short_model.model.config.num_hidden_layers = len(short_model.layers)
    offline.save_pruned(short_model.model, out_dir, removed_layers=removed,
                        extra={"layer_scores": [float(x) for x in short_model.importances], "docs": max_docs})


if __name__ == "__main__":
    main()
