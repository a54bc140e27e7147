#!/usr/bin/env python3
"""Layer goldens for wquant-paroquant: ParoQuant's MLX RotateQuantizedLinear
(z-lab/paroquant, paroquant/inference/backends/mlx/modules.py + rotation.py;
arXiv:2511.10645) on random layers in the layout its MLX loader produces
(`weight`/`scales`/`biases` MLX affine, `theta` [krot, in/2], `pairs` int16
[krot, in] local to each group, `channel_scales` [1, in]).

The paroquant package is not a dependency here, and its rotation is a
Metal-only kernel; `rotate_reference` transcribes that kernel's source (a
float32 tile per group: x * channel_scales, then for each round k and pair t,
a' = a c + b s, b' = b c - a s, one cast back to x's dtype), and the matmul is
mlx's own `mx.quantized_matmul`, exactly as RotateQuantizedLinear.__call__.

Usage: make_paroquant_goldens.py OUT_DIR  (writes paroquant_layers.safetensors + .json)
"""
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

mx.set_default_device(mx.cpu)
rng = np.random.default_rng(2511)


def random_pairs(krot, dim, group):
    """Each round: a random perfect matching of every group's channels (local indices)."""
    pairs = np.zeros((krot, dim), dtype=np.int16)
    for k in range(krot):
        for g in range(dim // group):
            pairs[k, g * group:(g + 1) * group] = rng.permutation(group)
    return pairs


def rotate_reference(x, pairs, theta, channel_scales, group):
    """The Metal kernel of paroquant/inference/backends/mlx/rotation.py, in numpy float32."""
    shape = x.shape
    tile = np.array(x.astype(mx.float32)).reshape(-1, shape[-1]) * np.array(channel_scales.astype(mx.float32)).reshape(1, -1)
    krot, dim = pairs.shape
    half = group // 2
    cos, sin = np.cos(np.array(theta, dtype=np.float32)), np.sin(np.array(theta, dtype=np.float32))
    for k in range(krot):
        for g in range(dim // group):
            for t in range(half):
                i = g * group + int(pairs[k, g * group + 2 * t])
                j = g * group + int(pairs[k, g * group + 2 * t + 1])
                c, s = cos[k, g * half + t], sin[k, g * half + t]
                a, b = tile[:, i].copy(), tile[:, j].copy()
                tile[:, i] = a * c + b * s
                tile[:, j] = b * c - a * s
    return mx.array(tile.reshape(shape)).astype(x.dtype)


def main():
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = [
        # name, in, out, group, krot, bits, dtype, bias
        ("g128_k8_f32", 256, 64, 128, 8, 4, mx.float32, False),
        ("g64_k4_bf16_bias", 128, 96, 64, 4, 4, mx.bfloat16, True),
        ("g128_k8_f16", 256, 32, 128, 8, 4, mx.float16, False),
    ]
    tensors, meta = {}, {"cases": []}
    for name, din, dout, group, krot, bits, dtype, bias in cases:
        w = mx.array(rng.normal(size=(dout, din)).astype(np.float32)).astype(dtype)
        weight, scales, biases = mx.quantize(w, group_size=group, bits=bits)
        theta = mx.array(rng.uniform(-np.pi, np.pi, size=(krot, din // 2)).astype(np.float32))
        pairs = random_pairs(krot, din, group)
        channel_scales = mx.array(rng.uniform(0.5, 2.0, size=(1, din)).astype(np.float32)).astype(dtype)
        x = mx.array(rng.normal(size=(2, 3, din)).astype(np.float32)).astype(dtype)
        rotated = rotate_reference(x, pairs, theta, channel_scales, group)
        y = mx.quantized_matmul(rotated, weight, scales=scales, biases=biases, transpose=True,
                                group_size=group, bits=bits)
        p = {"weight": weight, "scales": scales, "biases": biases, "theta": theta,
             "pairs": mx.array(pairs), "channel_scales": channel_scales, "x": x}
        if bias:
            p["bias"] = mx.array(rng.normal(size=(dout,)).astype(np.float32)).astype(dtype)
            y = y + p["bias"]
        p["y"] = y
        for k, v in p.items():
            tensors[f"{name}.{k}"] = v
        meta["cases"].append({"name": name, "in": din, "out": dout, "group_size": group, "krot": krot,
                              "bits": bits, "dtype": str(dtype).split(".")[-1], "bias": bias})
    mx.save_safetensors(str(out_dir / "paroquant_layers.safetensors"), tensors)
    (out_dir / "paroquant_layers.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
