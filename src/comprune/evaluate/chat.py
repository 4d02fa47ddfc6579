"""Greedy answers to chat prompts: users judge a pruned model by what it says as much as by its perplexity."""
from __future__ import annotations

import torch

PROMPTS = ("How many legs does a spider have?", "What is 7 plus 5?", "What is the capital of France?",
           "Name three colours of the rainbow.", "Write one sentence about the sea.")


@torch.inference_mode()
def chat_answers(model, tokenizer, prompts=PROMPTS, max_new_tokens: int = 40) -> list[str]:
    """The model's greedy reply to each prompt through the tokenizer's chat template (plain text without one)."""
    out = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        else:
            text = prompt + "\n"
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out
