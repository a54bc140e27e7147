#!/usr/bin/env python3
"""Greedy goldens from mlx-lm for a real Qwen2.5-Coder model converted from its
GGUF by `rmlx convert --from-gguf` (host/tests/real_qwen25.rs compares rmlx
against them on the same files, converted again: the converter is
deterministic, and the file hashes recorded here prove it).

mlx-lm loads the directory and computes in float32 (`model.set_dtype`: every
floating tensor, quantization scales and biases included, is cast; quantized
weights stay packed), on the CPU. Each prompt is a chat rendered through the
model's own chat template (`tokenizer.apply_chat_template`, Hugging Face's
jinja); the last one passes `tools`, so Qwen2.5's tool prompt is checked too.

Usage: real_qwen25_goldens.py MODEL_DIR OUT_JSON [MAX_TOKENS]
Writes {"model", "dtype", "files": {name: sha256}, "prompts": [{"kind", "messages",
"tools", "text", "prompt", "tokens", "margins", "answer"}]}; margins[i] is the
top-1 minus top-2 float32 logit at step i (a test skips near ties), and the
tokens stop at the first EOS or after MAX_TOKENS (default 32).
"""
import hashlib
import json
import sys
from pathlib import Path

import mlx.core as mx

mx.set_default_device(mx.cpu)

from mlx_lm import load  # noqa: E402
from smollm2_goldens import greedy  # noqa: E402 (same directory)

CHATS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the sum of a list of numbers.",
    "Explain in two sentences what a hash map is.",
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]
TOOL_CHAT = "What is the weather like in Paris today?"
HASHED = ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    model_dir, out = sys.argv[1:3]
    max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    model, tokenizer = load(model_dir)
    model.set_dtype(mx.float32)
    eos = set(tokenizer.eos_token_ids)
    cases = [("chat", [{"role": "user", "content": t}], None) for t in CHATS]
    cases.append(("tools", [{"role": "user", "content": TOOL_CHAT}], TOOLS))
    result = {
        "model": Path(model_dir).name,
        "dtype": "float32",
        "max_tokens": max_tokens,
        "eos": sorted(eos),
        "files": {f: sha256(Path(model_dir) / f) for f in HASHED},
        "prompts": [],
    }
    for kind, messages, tools in cases:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        ids = list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True))
        tokens, margins = greedy(model, ids, max_tokens)
        # generate_step runs past EOS; keep what a chat would produce (EOS included).
        for i, t in enumerate(tokens):
            if t in eos:
                tokens, margins = tokens[: i + 1], margins[: i + 1]
                break
        answer = tokenizer.decode(tokens)
        print(f"[{kind}] {messages[0]['content']!r} -> {answer!r}", file=sys.stderr)
        result["prompts"].append(
            {"kind": kind, "messages": messages, "tools": tools, "text": text, "prompt": ids,
             "tokens": tokens, "margins": margins, "answer": answer}
        )
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
