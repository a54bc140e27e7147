#!/usr/bin/env python3
"""Greedy goldens from mlx-lm for the default model (SmolLM2-135M-Instruct)
converted by `rmlx convert` to several weight formats, computed by mlx-lm at
each model's own dtype on these exact files. Short on purpose (CPU time):
one chat prompt and one raw prompt, MAX_TOKENS steps each.

Usage: smollm2_formats_goldens.py OUT_JSON MODEL_DIR [MODEL_DIR ...]
Writes {"models": {MODEL_DIR: {"prompts": [{"kind", "text", "prompt", "tokens",
"margins", "answer"}]}}}; margins[i] is mlx-lm's top-1 minus top-2 logit at step i
(float32), so a caller can skip steps where the argmax is a near tie.
"""
import json
import sys

import mlx.core as mx

mx.set_default_device(mx.cpu)

from mlx_lm import load  # noqa: E402
from smollm2_goldens import greedy as greedy_n  # noqa: E402 (same directory)

MAX_TOKENS = 12


def greedy(model, prompt):
    return greedy_n(model, prompt, MAX_TOKENS)
CHATS = ["What is the capital of France?"]
RAW = ["The quick brown fox"]


def one(model_dir):
    model, tokenizer = load(model_dir)
    cases = []
    for text in CHATS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        cases.append(("chat", text, list(ids)))
    for text in RAW:
        cases.append(("raw", text, tokenizer.encode(text)))
    prompts = []
    for kind, text, ids in cases:
        tokens, margins = greedy(model, ids)
        prompts.append({"kind": kind, "text": text, "prompt": ids, "tokens": tokens, "margins": margins,
                        "answer": tokenizer.decode(tokens)})
    return {"prompts": prompts}


def main():
    out, dirs = sys.argv[1], sys.argv[2:]
    result = {"models": {d: one(d) for d in dirs}}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
