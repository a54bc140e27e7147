"""mlx-lm's BitLinear on the CPU, for the golden scripts.

mlx-lm 0.32.2's `BitLinear.__call__` (mlx_lm/models/bitlinear_layers.py) runs a
Metal-only custom kernel (`mx.fast.metal_kernel`); on Linux it raises "No
Metal back-end". `install()` swaps in that kernel's source transcribed into
MLX ops, so mlx-lm's own bitnet model, loader and generator run unchanged on
the CPU:

    kernel                                   here
    sum[j] += v * (((w >> 2j) & 3) - 1)      x(f32) @ ternary(f32)^T, where
    out[row + j * out/4] = sum[j] * scale    rows j*out/4.. come from bits 2j..2j+1
    scale = invert ? 1 / ws[0] : ws[0]       the same, in float32
    static_cast<T>(...)                      .astype(weight_scale.dtype)
    (then, in __call__) + bias               + bias

Only the summation order differs from the kernel (float32 either way).
`install()` first checks the transcription against make_bitnet_goldens.py's
recorded layer outputs (tests/fixtures/bitnet), which were computed by an
independent numpy transcription of the same kernel.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_lm.models.bitlinear_layers import BitLinear

ROOT = Path(__file__).resolve().parents[2]


def bitlinear_call(self, x):
    dtype = self.weight_scale.dtype
    assert x.dtype == dtype, "Wrong type for input."  # as execute_matmul_kernel
    w = self.weight  # uint8 [out/4, in]
    codes = mx.concatenate([(w >> (2 * j)) & 3 for j in range(4)], axis=0)  # [out, in]
    ternary = codes.astype(mx.float32) - 1.0
    y = x.astype(mx.float32) @ ternary.T  # [..., out]
    ws = self.weight_scale[0].astype(mx.float32)
    scale = 1.0 / ws if self.invert_weight_scales else ws
    y = (y * scale).astype(dtype)
    if self.bias is not None:
        y = mx.add(y, self.bias)
    return y


def _self_check():
    d = ROOT / "tests" / "fixtures" / "bitnet"
    meta = json.loads((d / "bitnet_layers.json").read_text())
    t = mx.load(str(d / "bitnet_layers.safetensors"))
    for case in meta["cases"]:
        n = case["name"]
        layer = BitLinear(case["in"], case["out"], bias=case["bias"],
                          invert_weight_scales=case["mode"] == "bitnet")
        layer.weight = t[f"{n}.weight"]
        layer.weight_scale = t[f"{n}.weight_scale"]
        if case["bias"]:
            layer.bias = t[f"{n}.bias"]
        got = np.array(bitlinear_call(layer, t[f"{n}.x"]).astype(mx.float32))
        want = np.array(t[f"{n}.y"].astype(mx.float32))
        tol = 1e-5 if case["dtype"] == "float32" else 1e-2
        assert np.allclose(got, want, rtol=tol, atol=tol), (n, float(np.abs(got - want).max()))


def install():
    if mx.metal.is_available():
        return  # the real kernel runs
    _self_check()
    BitLinear.__call__ = bitlinear_call
