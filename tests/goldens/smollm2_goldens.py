#!/usr/bin/env python3
"""Greedy goldens from mlx-lm for a real converted model (the default
SmolLM2-135M-Instruct), computed at the model's own dtype on these exact files.

Usage: smollm2_goldens.py MODEL_DIR OUT_JSON
Writes {"prompts": [{"kind", "text", "prompt": ids, "tokens": ids, "margins": [...]}]}.
"""
import json
import sys

import mlx.core as mx
import numpy as np

mx.set_default_device(mx.cpu)

from mlx_lm import load  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

MAX_TOKENS = 24
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
]
RAW = ["The quick brown fox", "def fibonacci(n):"]


def greedy(model, prompt, max_tokens=MAX_TOKENS):
    """mlx-lm's greedy tokens and each step's top-1/top-2 logit margin."""
    seen = []

    def capture(tokens, logits):
        seen.append(np.array(logits[0].astype(mx.float32)))
        return logits

    tokens = [
        int(t)
        for t, _ in generate_step(
            mx.array(prompt, dtype=mx.uint32),
            model,
            max_tokens=max_tokens,
            prompt_cache=make_prompt_cache(model),
            logits_processors=[capture],
        )
    ]
    margins = []
    for lg in seen[:max_tokens]:
        top = np.sort(lg)[::-1]
        margins.append(float(top[0] - top[1]))
    return tokens, margins


def main():
    model_dir, out = sys.argv[1:3]
    model, tokenizer = load(model_dir)
    cases = []
    for text in CHATS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        cases.append(("chat", text, list(ids)))
    for text in RAW:
        cases.append(("raw", text, tokenizer.encode(text)))
    result = {"model": model_dir, "prompts": []}
    for kind, text, ids in cases:
        tokens, margins = greedy(model, ids)
        result["prompts"].append(
            {"kind": kind, "text": text, "prompt": ids, "tokens": tokens, "margins": margins,
             "answer": tokenizer.decode(tokens)}
        )
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
