"""Run CASIA-IVA-Lab/FLAP's pruning (lib/prune.py: prune_flap, prune_wanda_sp) on a local model, offline, CPU.

    python flap_shim.py CHECKOUT OUT_DIR -- <main.py arguments>

CHECKOUT is a copy of the repository with patches/flap-gqa.patch applied (GQA: a head unit is a KV group with
its query heads, head_dim read from the model instead of LLaMA-7B's 128; compensation means kept in the model's
dtype). main.py's body is repeated here because it is CUDA/LLaMA-7B specific (cuda:0, 32 layers, its own
LLaMA-1 modeling file whose only change is a bias on o_proj/down_proj): the stock transformers Llama gets zero
biases on o_proj and down_proj, as get_llm does. Data shim: get_loaders(any name) draws `nsamples` windows from
the local C4 sample with FLAP's get_c4 loop (the repo calibrates FLAP on WikiText-2 train, wanda-sp on C4).
Device shim: Tensor.cuda() is the identity on this CPU-only machine.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline  # noqa: E402


def parse(argv):
    # main.py's parser (same names and defaults)
    p = argparse.ArgumentParser()
    p.add_argument('--model', type=str)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--nsamples', type=int, default=2048)
    p.add_argument('--pruning_ratio', type=float, default=0)
    p.add_argument('--remove_heads', type=int, default=8)
    p.add_argument("--metrics", type=str, default="WIFV", choices=["IFV", "WIFV", "WIFN", 'N/A'])
    p.add_argument("--structure", type=str, default="AL-AM", choices=["UL-UM", "UL-MM", "AL-MM", "AL-AM", 'N/A'])
    p.add_argument("--prune_method", type=str, default="flap", choices=["flap", "wanda_sp", "mag_sp"])
    p.add_argument('--unstr', action="store_true")
    return p.parse_args(argv)


def main():
    checkout, out_dir = sys.argv[1], sys.argv[2]
    rest = sys.argv[sys.argv.index("--") + 1:]
    args = parse(rest)
    offline.stub_datasets()
    sys.path.insert(0, checkout)
    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.Tensor.cuda = lambda self, *a, **k: self
    import lib.prune as P
    texts = offline.LocalRows(offline.c4_texts())

    def get_loaders(name='wikitext2', nsamples=128, seed=0, seqlen=2048, tokenizer=None):
        # lib/data.py:get_c4's loop on the local sample
        random.seed(seed)
        trainloader = []
        for _ in range(nsamples):
            while True:
                i = random.randint(0, len(texts) - 1)
                trainenc = tokenizer(texts[i]['text'], return_tensors='pt')
                if trainenc.input_ids.shape[1] > seqlen:
                    break
            i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
            j = i + seqlen
            inp = trainenc.input_ids[:, i:j]
            tar = inp.clone()
            tar[:, :-1] = -100
            trainloader.append((inp, tar))
        return trainloader, None

    P.get_loaders = get_loaders
    np.random.seed(args.seed)
    torch.random.manual_seed(args.seed)
    model = LlamaForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32, low_cpu_mem_usage=True)
    for layer in model.model.layers:  # get_llm: zero biases on o_proj and down_proj
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features))
    model.seqlen = 128
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    device = torch.device("cpu")
    before = sum(p.numel() for p in model.parameters())
    {"flap": P.prune_flap, "wanda_sp": P.prune_wanda_sp, "mag_sp": P.prune_magnitude_sp}[args.prune_method](
        args, model, tokenizer, device)
    if args.prune_method != "flap":  # wanda-sp/mag-sp add no compensation: the zero biases are not parameters
        for layer in model.model.layers:
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                if lin.bias is not None and not lin.bias.any():
                    lin.bias = None
    offline.save_pruned(model, out_dir, extra={"recipe": rest, "official_params_before_with_zero_biases": before})


if __name__ == "__main__":
    main()
