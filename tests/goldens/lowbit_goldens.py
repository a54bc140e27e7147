#!/usr/bin/env python3
"""Goldens for the low-bit families, with make_goldens.py's writer and
recorder (run through it: `make_goldens.py bitnet`, `make_goldens.py bonsai`):

- `bitnet-*`: mlx-lm's `bitnet` model (BitNetForCausalLM), packed ternary
  BitLinear projections;
- `qwen3-bonsai-*`: qwen3 in Ternary Bonsai's affine 2-bit g128 layout.

Each model is saved, reloaded by mlx-lm's `load_model` and recorded from that.
"""
import contextlib
import io

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

import bitlinear_cpu
import make_goldens as mg
import mlx_lm.utils as lm_utils
from mlx_lm.models import bitnet, qwen3
from mlx_lm.models.bitlinear_layers import bitnet_quantize

# BitNet (mlx_lm.models.bitnet): every projection is a packed ternary
# BitLinear in mlx-lm's own class, so there is no dense or affine variant;
# the goldens are that format with float32 activations, with the options on,
# and in bfloat16 as the released checkpoints ship (embeddings, norms and
# weight_scale bf16). mlx-lm's BitLinear kernel is Metal-only: on the CPU
# bitlinear_cpu.install() swaps in its source transcribed into MLX ops.
BITNET_COMMON = {
    **mg.COMMON,
    "model_type": "bitnet",
    "architectures": ["BitNetForCausalLM"],
    "hidden_act": "relu2",
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "quantization_config": {
        "quant_method": "bitnet",
        "linear_class": "autobitlinear",
        "quantization_mode": "offline",
    },
}
BITNET = {
    # name: (config, dtype, seed)
    "bitnet-f32": (BITNET_COMMON, mx.float32, 5678),
    # untied lm_head (mlx-lm's loader makes it a BitLinear too), q/k/v/o and
    # MLP biases, one KV head, head_dim derived, traditional + linear RoPE.
    "bitnet-options-f32": (
        {
            **{k: v for k, v in BITNET_COMMON.items() if k != "head_dim"},
            "tie_word_embeddings": False,
            "attention_bias": True,
            "mlp_bias": True,
            "num_key_value_heads": 1,
            "rope_traditional": True,
            "rope_scaling": {"type": "linear", "factor": 2.0},
        },
        mx.float32,
        6789,
    ),
    "bitnet-bf16": (
        {**BITNET_COMMON, "rope_theta": 500000.0, "torch_dtype": "bfloat16"},
        mx.bfloat16,
        7890,
    ),
}


def pack_ternary(ternary):
    """transformers' pack_weights: uint8 [out/4, in], bits 2j..2j+1 of row r
    hold output row r + j*out/4 as the code weight + 1."""
    rows = ternary.shape[0] // 4
    codes = (ternary + 1).astype(np.uint8)
    packed = np.zeros((rows, ternary.shape[1]), dtype=np.uint8)
    for j in range(4):
        packed |= codes[j * rows:(j + 1) * rows] << (2 * j)
    return packed


def bitnet_golden(name):
    bitlinear_cpu.install()
    config, dtype, seed = BITNET[name]
    model = bitnet.Model(bitnet.ModelArgs.from_dict(config))
    model = bitnet_quantize(model, config["quantization_config"])  # as load_model does
    rng = np.random.default_rng(seed)
    params = []
    for path, v in tree_flatten(model.parameters()):
        if v.dtype == mx.uint8:  # a BitLinear's packed weight [out/4, in]
            ternary = rng.integers(-1, 2, size=(4 * v.shape[0], v.shape[1]))
            w = mx.array(pack_ternary(ternary))
        elif path.endswith("weight_scale"):  # x·W (~sqrt(2/3·in)) * ~0.12
            w = mx.array([rng.uniform(0.08, 0.16)], dtype=mx.float32).astype(dtype)
        elif path.endswith("norm.weight"):
            w = mx.array(1.0 + mg.NORM_STD * rng.normal(size=v.shape), dtype=mx.float32).astype(dtype)
        else:  # embeddings, biases
            w = mx.array(mg.WEIGHT_STD * rng.normal(size=v.shape), dtype=mx.float32).astype(dtype)
        assert w.shape == v.shape, (path, w.shape, v.shape)
        params.append((path, w))
    model.update(tree_unflatten(params))
    mg.save(name, model, config)
    # The golden comes from the files as mlx-lm's loader reads them back.
    model, _ = lm_utils.load_model(mg.MODELS_DIR / name)
    packed = sum(1 for _, m in model.named_modules() if type(m).__name__ == "BitLinear")
    min_margin, max_dev = mg.golden(name, model)
    mg.log(
        f"{name:22s} {packed} BitLinear layers, min top1-top2 margin "
        f"{min_margin:.2g}, one-pass-prefill max |dlogit| {max_dev:.2g}"
    )


# Ternary Bonsai (prism-ml/Ternary-Bonsai-{1.7B,4B,8B}-mlx-2bit): Qwen3 whose
# every Linear and the Embedding hold w = s_g * t, t in {-1, 0, +1}, one
# float16 s_g per group of 128, shipped in MLX's affine 2-bit format at group
# 128 with float16 scales and biases (scale s_g, bias -s_g, codes t + 1; code
# 3 unused). mlx-lm's quantizer would not write that (its min/max grid has no
# zero), so the model is quantized by mlx-lm for its structure and config and
# then given Bonsai's codes. Hidden 128 so that group 128 divides every input.
BONSAI = {
    "qwen3-bonsai-q2-g128": (
        {
            **mg.ARCHS["qwen3"][1],
            "hidden_size": 128,
            "intermediate_size": 256,
            "head_dim": 32,
            "torch_dtype": "float16",
        },
        8901,
    ),
}


def bonsai_golden(name):
    config, seed = BONSAI[name]
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    rng = np.random.default_rng(seed)
    f16 = mx.float16
    ternary = {}  # module path -> (t int8 [out, in], s float16 [out, in/128])
    params = []
    for path, v in tree_flatten(model.parameters()):
        if path.endswith("norm.weight"):
            params.append((path, mx.array(1.0 + mg.NORM_STD * rng.normal(size=v.shape)).astype(f16)))
            continue
        rows, cols = v.shape
        t = rng.integers(-1, 2, size=(rows, cols)).astype(np.int8)
        sc = mx.array(rng.uniform(0.05, 0.15, size=(rows, cols // 128))).astype(f16)
        ternary[path.rsplit(".", 1)[0]] = (t, sc)
        dense = mx.array(t.astype(np.float32)).reshape(rows, -1, 128) * sc.astype(mx.float32)[..., None]
        params.append((path, dense.reshape(rows, cols).astype(f16)))
    model.update(tree_unflatten(params))
    with contextlib.redirect_stdout(io.StringIO()):
        model, qconfig = lm_utils.quantize_model(model, dict(config), 128, 2, mode="affine")
    packed = []
    for path, m in model.named_modules():
        if path not in ternary:
            continue
        assert isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)), path
        t, sc = ternary[path]
        codes = (t + 1).astype(np.uint32).reshape(t.shape[0], -1, 16)
        words = (codes << (2 * np.arange(16, dtype=np.uint32))).sum(axis=-1, dtype=np.uint32)
        m.weight, m.scales, m.biases = mx.array(words), sc, -sc
        dq = mx.dequantize(m.weight, m.scales, m.biases, group_size=128, bits=2)
        want = mx.array(t.astype(np.float32)).reshape(t.shape[0], -1, 128) * sc.astype(mx.float32)[..., None]
        assert mx.array_equal(dq, want.reshape(t.shape).astype(f16)).item(), path
        packed.append(path)
    assert len(packed) == len(ternary), (packed, list(ternary))
    mg.save(name, model, qconfig)
    model, _ = lm_utils.load_model(mg.MODELS_DIR / name)
    min_margin, max_dev = mg.golden(name, model)
    bpw = lm_utils.compute_bits_per_weight(model)
    mg.log(
        f"{name:22s} {bpw:6.3f} bits/weight, {len(packed)} ternary modules, min top1-top2 "
        f"margin {min_margin:.2g}, one-pass-prefill max |dlogit| {max_dev:.2g}"
    )


def make(family):
    """Writes every model of `family` ("bitnet" or "bonsai"); returns their names."""
    models, build = {"bitnet": (BITNET, bitnet_golden), "bonsai": (BONSAI, bonsai_golden)}[family]
    for name in models:
        build(name)
    return list(models)
