#!/usr/bin/env python3
"""Layer goldens for wquant-bitnet from mlx-lm's own BitNet classes.

Builds a tiny `mlx_lm.models.bitnet.Model` (mlx-lm 0.32.2; its Linear layers
are `mlx_lm.models.bitlinear_layers.BitLinear`), gives its BitLinear layers
random ternary weights packed exactly as transformers' `pack_weights` does
(uint8 [out/4, in], bits 2j..2j+1 of row r -> output row r + j*out/4, code
c -> weight c - 1) and random `weight_scale`s, and records each layer's output
on random inputs.

mlx-lm's BitLinear.__call__ is a Metal-only custom kernel (`mx.fast.metal_kernel`;
on Linux it raises "No Metal back-end"). The reference here is that kernel's
source transcribed line for line (`kernel_reference`: float accumulation of
x * (((w >> 2j) & 3) - 1), one multiply by `1 / weight_scale` or `weight_scale`,
one cast to the activation dtype), fed with the layer's own attributes. Where
Metal exists, the script also runs the real layer and asserts both agree.

Usage: make_bitnet_goldens.py OUT_DIR   (writes bitnet_layers.safetensors + .json)
"""
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_lm.models import bitnet
from mlx_lm.models.bitlinear_layers import BitLinear

rng = np.random.default_rng(1234)


def pack_weights(ternary):
    """transformers.integrations.bitnet.pack_weights for values in {-1, 0, 1}, out % 4 == 0."""
    out, cols = ternary.shape
    rows = out // 4
    codes = (ternary + 1).astype(np.uint8)
    packed = np.zeros((rows, cols), dtype=np.uint8)
    for i in range(4):
        packed |= codes[i * rows:(i + 1) * rows] << (2 * i)
    return packed


def kernel_reference(layer, x):
    """bitlinear_layers.make_bitlinear_kernel's source, in float32 numpy."""
    shape = x.shape
    xs = np.array(x.astype(mx.float32)).reshape(-1, shape[-1])
    w = np.array(layer.weight)  # uint8 [out/4, in]
    out_features = layer.out_features
    ws = float(np.array(layer.weight_scale.astype(mx.float32))[0])
    scale = np.float32(1.0 / ws) if layer.invert_weight_scales else np.float32(ws)
    y = np.zeros((xs.shape[0], out_features), dtype=np.float32)
    for j in range(4):
        t = ((w >> (2 * j)) & 3).astype(np.float32) - 1.0  # [out/4, in]
        y[:, j * (out_features // 4):(j + 1) * (out_features // 4)] = xs @ t.T
    y = mx.array(y * scale).astype(layer.weight_scale.dtype)
    y = y.reshape(*shape[:-1], out_features)
    if layer.bias is not None:
        y = mx.add(y, layer.bias)
    return y


def main():
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    args = bitnet.ModelArgs(
        model_type="bitnet", hidden_size=96, num_hidden_layers=1, intermediate_size=256,
        num_attention_heads=3, num_key_value_heads=1, rms_norm_eps=1e-5, vocab_size=64,
        head_dim=32, attention_bias=True, mlp_bias=False, tie_word_embeddings=True,
    )
    model = bitnet.Model(args)
    layer0 = model.model.layers[0]
    # (case, module, invert_weight_scales, dtype): invert = linear_class "bitlinear" (mode
    # bitnet), otherwise "autobitlinear" (mode bitnet-autobitlinear).
    cases = [
        ("q_proj_f32", layer0.self_attn.q_proj, True, mx.float32),
        ("k_proj_f32_auto", layer0.self_attn.k_proj, False, mx.float32),
        ("down_proj_f32", layer0.mlp.down_proj, True, mx.float32),
        ("up_proj_bf16_auto", layer0.mlp.up_proj, False, mx.bfloat16),
        ("o_proj_bf16", layer0.self_attn.o_proj, True, mx.bfloat16),
        ("gate_proj_f16_auto", layer0.mlp.gate_proj, False, mx.float16),
    ]
    tensors, meta = {}, {"mlx_lm_version": None, "cases": []}
    import mlx_lm
    meta["mlx_lm_version"] = mlx_lm.__version__
    metal = mx.metal.is_available()
    for name, layer, invert, dtype in cases:
        assert isinstance(layer, BitLinear)
        out_f, in_f = layer.out_features, layer.in_features
        ternary = rng.integers(-1, 2, size=(out_f, in_f)).astype(np.int8)
        layer.weight = mx.array(pack_weights(ternary))
        assert layer.weight.shape == ((out_f + 3) // 4, in_f)
        layer.weight_scale = mx.array([rng.uniform(0.5, 4.0)], dtype=mx.float32).astype(dtype)
        layer.invert_weight_scales = invert
        if layer.bias is not None:
            layer.bias = mx.array(rng.normal(size=(out_f,)).astype(np.float32)).astype(dtype)
        x = mx.array(rng.normal(size=(2, 5, in_f)).astype(np.float32)).astype(dtype)
        y = kernel_reference(layer, x)
        # The unpacked weights themselves, as transformers' unpack_weights gives them.
        dense = np.concatenate([((np.array(layer.weight) >> (2 * j)) & 3).astype(np.int8) - 1 for j in range(4)])
        assert (dense == ternary).all()
        if metal:
            got = layer(x)
            assert mx.allclose(got.astype(mx.float32), y.astype(mx.float32), rtol=1e-3, atol=1e-3).item(), name
        tensors[f"{name}.weight"] = layer.weight
        tensors[f"{name}.weight_scale"] = layer.weight_scale
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias
        tensors[f"{name}.x"] = x
        tensors[f"{name}.y"] = y
        meta["cases"].append({"name": name, "mode": "bitnet" if invert else "bitnet-autobitlinear",
                              "in": in_f, "out": out_f, "dtype": str(dtype).split(".")[-1],
                              "bias": layer.bias is not None})
    mx.save_safetensors(str(out_dir / "bitnet_layers.safetensors"), tensors)
    (out_dir / "bitnet_layers.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
