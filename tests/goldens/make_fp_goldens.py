#!/usr/bin/env python3
"""Golden fixtures for MLX's floating-point microscaled modes (mxfp4, mxfp8,
nvfp4) and a recipe mixing modes per layer, made with mlx-lm 0.32.2's own code.

    .venv-dev/bin/python tests/goldens/make_fp_goldens.py

Reuses make_goldens.py's f32 models (same seeds, so the same weights), its
writer and its recorder; writes only the new names (ARCH-mxfp4, ARCH-mxfp8,
ARCH-nvfp4, ARCH-mixed-fp for ARCH in llama, llama-tied, qwen3), so the
existing fixtures stay byte-identical. The compute is float32 except where
the mode itself decides otherwise: mx.dequantize of uint8 scales returns
bfloat16, so a quantized embedding's lookup is bfloat16 in these modes
(exactly as mlx.nn.QuantizedEmbedding does it); every matmul is float32.
"""

import contextlib
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_goldens as mg  # noqa: E402  (sets the CPU default device)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import mlx_lm.utils as lm_utils  # noqa: E402

# (suffix, mode, recipe)
FP_QUANTS = [
    ("mxfp4", "mxfp4", None),
    ("mxfp8", "mxfp8", None),
    ("nvfp4", "nvfp4", None),
    ("mixed-fp", "mxfp4", "mixed_fp"),
]


def mixed_fp_predicate(path, module):
    """Modes per layer: embedding mxfp8, untied lm_head affine 6-bit g64,
    attention nvfp4, layer 1's o_proj left dense, the MLP at the default
    (mxfp4)."""
    if path.endswith("embed_tokens"):
        return {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    if path == "lm_head":
        return {"group_size": 64, "bits": 6, "mode": "affine"}
    if path == "model.layers.1.self_attn.o_proj":
        return False
    if "self_attn" in path:
        return {"group_size": 16, "bits": 4, "mode": "nvfp4"}
    return True


def quantize(arch, params, mode, recipe):
    _, config, _ = mg.ARCHS[arch]
    model = mg.clone(arch, params)
    pred = mixed_fp_predicate if recipe == "mixed_fp" else None
    with contextlib.redirect_stdout(io.StringIO()):
        model, qconfig = lm_utils.quantize_model(
            model, dict(config), None, None, mode=mode, quant_predicate=pred
        )
    mx.eval(model.parameters())
    for path, v in tree_flatten(model.parameters()):
        if path.endswith(".scales"):
            assert v.dtype in (mx.uint8, mx.float32), (path, v.dtype)
        elif path.endswith(".weight") and not path.endswith("norm.weight"):
            assert v.dtype in (mx.uint32, mx.float32), (path, v.dtype)
    return model, qconfig


def main():
    names = []
    for arch in mg.ARCHS:
        _, _, params = mg.build_f32(arch)
        for suffix, mode, recipe in FP_QUANTS:
            name = f"{arch}-{suffix}"
            model, qconfig = quantize(arch, params, mode, recipe)
            mg.save(name, model, qconfig)
            min_margin, max_dev = mg.golden(name, model)
            names.append(name)
            bpw = lm_utils.compute_bits_per_weight(model)
            mg.log(
                f"{name:22s} {bpw:6.3f} bits/weight, min top1-top2 margin "
                f"{min_margin:.2g}, one-pass-prefill max |dlogit| {max_dev:.2g}"
            )
    mg.log(f"wrote {len(names)} fp-mode models and goldens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
