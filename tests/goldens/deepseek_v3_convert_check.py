#!/usr/bin/env python3
"""Checks a deepseek_v3 model written by `rmlx convert` from a Hugging Face
layout checkpoint (host/tests/convert_deepseek_v3.rs) with mlx-lm 0.32.2.

Usage: deepseek_v3_convert_check.py SRC_DIR DST_DIR OUT_JSON

1. Loads DST with mlx-lm's own loader (`mlx_lm.utils.load_model`, strict),
   without the multi-token-prediction module `model.layers.{N}.*` that rmlx
   keeps and mlx-lm's convert drops (its sanitize drops only layer 61, and
   its model has no such layer), and records greedy generations as
   make_goldens.py's `record` does (tokens, raw logits, top1-top2 margins),
   for the Rust side to compare with rmlx on the same files.
2. Re-quantizes each quantized module of DST from SRC's float weights with
   `mx.quantize` at the module's (group_size, bits, mode) (a stacked
   `switch_mlp` projection from SRC's experts one by one, stacked) and lists
   the arrays that are not bit-identical: rmlx's quantization must equal
   MLX's (and so mlx-lm's `quantize_model`).
Writes {"model": ..., "prompts": [...], "quantized_modules": n,
"bit_mismatches": [names], "mtp_tensors_dropped": n}.
"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_goldens as mg  # noqa: E402  (sets the CPU device first)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import mlx_lm.utils as lm_utils  # noqa: E402

# deepseek_v3_goldens.py's prompts (vocab 64)
PROMPTS = [[42], [3, 17, 9, 60, 5, 33, 21], [(i * 37 + 11) % 64 for i in range(23)]]


def load(d):
    w = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        w.update(mx.load(str(f)))
    return w


def source_weight(src, name):
    """SRC's float weight of module `name` (`...switch_mlp.P` stacked from
    `...experts.{e}.P`)."""
    if f"{name}.weight" in src:
        return src[f"{name}.weight"]
    prefix, proj = name.split(".switch_mlp.")
    parts = []
    while f"{prefix}.experts.{len(parts)}.{proj}.weight" in src:
        parts.append(src[f"{prefix}.experts.{len(parts)}.{proj}.weight"])
    return mx.stack(parts)


def main():
    src_dir, dst_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    config = json.loads((dst_dir / "config.json").read_text())
    mtp = f"model.layers.{config['num_hidden_layers']}."
    dst = load(dst_dir)
    kept = {k: v for k, v in dst.items() if not k.startswith(mtp)}
    with tempfile.TemporaryDirectory() as tmp:
        mx.save_safetensors(str(Path(tmp) / "model.safetensors"), kept, metadata={"format": "mlx"})
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        model, _ = lm_utils.load_model(Path(tmp))
    doc = {"model": dst_dir.name, "prompts": [], "mtp_tensors_dropped": len(dst) - len(kept)}
    for p in PROMPTS:
        tokens, logits, margins = mg.record(model, p)
        doc["prompts"].append({
            "prompt": p,
            "tokens": tokens,
            "logits": [[float(v) for v in lg] for lg in logits],
            "margins": margins,
        })
    src = load(src_dir)
    q = config["quantization"]
    n, bad = 0, []
    for k in sorted(dst):
        if not k.endswith(".scales"):
            continue
        name = k[: -len(".scales")]
        spec = q[name] if isinstance(q.get(name), dict) else q  # a per-module entry, else the default
        n += 1
        parts = mx.quantize(source_weight(src, name), spec["group_size"], spec["bits"], mode=spec.get("mode", "affine"))
        for part, want in zip(["weight", "scales", "biases"], parts):
            got = dst[f"{name}.{part}"]
            if got.dtype != want.dtype or got.shape != want.shape or not mx.array_equal(got, want).item():
                bad.append(f"{name}.{part}")
    doc["quantized_modules"] = n
    doc["bit_mismatches"] = bad
    out.write_text(json.dumps(doc))


if __name__ == "__main__":
    main()
