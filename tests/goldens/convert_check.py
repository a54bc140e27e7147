#!/usr/bin/env python3
"""Checks a model written by `rmlx convert` with mlx-lm 0.32.2.

Usage: convert_check.py SRC_DIR DST_DIR OUT_JSON

1. Loads DST with mlx-lm's own loader (mlx_lm.utils.load_model) and records
   greedy generations exactly like make_goldens.py (tokens, raw logits,
   top1-top2 margins), for the Rust side to compare with rmlx on the same files.
2. If SRC is dense (no `quantization` in its config.json), re-quantizes each of
   DST's quantized modules from SRC's weight with `mx.quantize` at the
   module's (group_size, bits, mode) and counts arrays that are not
   bit-identical: rmlx's quantization must equal MLX's (and so mlx-lm's).
Writes {"prompts": [...], "quantized_modules": n, "bit_mismatches": [names]}.
"""
import glob
import json
import sys
from pathlib import Path

import mlx.core as mx

mx.set_default_device(mx.cpu)

import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402

PROMPTS = [[42], [1, 17, 99, 128, 3, 200, 255]]
MAX_TOKENS = 8


def record(model, prompt):
    seen = []

    def capture(tokens, logits):
        seen.append(np.array(logits[0].astype(mx.float32)))
        return logits

    tokens = [
        int(t)
        for t, _ in generate_step(
            mx.array(prompt, dtype=mx.uint32),
            model,
            max_tokens=MAX_TOKENS,
            prompt_cache=make_prompt_cache(model),
            logits_processors=[capture],
        )
    ]
    logits = seen[:MAX_TOKENS]
    margins = []
    for lg in logits:
        top = np.sort(lg)[::-1]
        margins.append(float(top[0] - top[1]))
    return {
        "prompt": prompt,
        "tokens": tokens,
        "logits": [[float(v) for v in lg] for lg in logits],
        "margins": margins,
    }


def main():
    src, dst, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    model, config = load_model(dst)
    doc = {"prompts": [record(model, p) for p in PROMPTS]}
    src_config = json.loads((src / "config.json").read_text())
    n, bad = 0, []
    if "quantization" not in src_config:
        sw = {}
        for f in glob.glob(str(src / "*.safetensors")):
            sw.update(mx.load(f))
        dw = {}
        for f in glob.glob(str(dst / "*.safetensors")):
            dw.update(mx.load(f))
        for path, m in model.named_modules():
            if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                continue
            n += 1
            parts = mx.quantize(sw[f"{path}.weight"], m.group_size, m.bits, mode=m.mode)
            names = ["weight", "scales", "biases"][: len(parts)]
            for name, want in zip(names, parts):
                got = dw[f"{path}.{name}"]
                if got.dtype != want.dtype or not mx.array_equal(got, want).item():
                    bad.append(f"{path}.{name}")
    doc["quantized_modules"] = n
    doc["bit_mismatches"] = bad
    out.write_text(json.dumps(doc))


if __name__ == "__main__":
    main()
