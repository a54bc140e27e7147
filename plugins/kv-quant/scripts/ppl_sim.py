"""Dev script: perplexity of a small model (mlx-lm) when every attention layer
reads keys (and optionally values) that went through a KV codec's round trip
-- what attending over the compressed cache computes (the crate's tests show
scores/mix equal decode-then-matmul). For the turbo3 small-model analysis;
not used at run time.

The turbo round trip here mirrors rmlx-kv-quant's `turbo` family: SplitMix64
signs (seed turbo::SEED), Hadamard, Lloyd-Max codebook of the sphere
marginal, norm-preserving norm stored in bf16.

usage: ppl_sim.py MODEL TEXT [--tokens N] [--calib TEXT2] MODE...
MODE: none | q8 | q4 | fp8 | turboB | turboB-c (keys centered with the calib
text's per-layer mean) | kB:vB pairs like q8:turbo3
"""
import argparse
import math

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.models import llama, qwen2, qwen3

SEED = 0x7475_7262_6F71_0001
M64 = (1 << 64) - 1


def splitmix_signs(d, seed):
    s, out = seed, []
    for _ in range(d):
        s = (s + 0x9E3779B97F4A7C15) & M64
        z = s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        z ^= z >> 31
        out.append(1.0 if (z >> 63) == 0 else -1.0)
    return mx.array(out, dtype=mx.float32)


def codebook(d, bits, grid=1 << 16):
    """Lloyd-Max levels of the sphere marginal (as codebook.rs: prefix sums)."""
    tmax = min(1.0, 12 / math.sqrt(d))
    dt = 2 * tmax / grid
    t = -tmax + (np.arange(grid) + 0.5) * dt
    w = np.clip(1 - t * t, 0, None) ** ((d - 3) / 2)
    w /= w.sum()
    cm, cx = np.concatenate([[0], np.cumsum(w)]), np.concatenate([[0], np.cumsum(w * t)])
    n = 1 << bits
    c = (np.arange(n) - (n - 1) / 2) * (5.0 / n) / math.sqrt(d)  # symmetric start
    for _ in range(2000):
        b = np.clip(np.round(((c[:-1] + c[1:]) / 2 + tmax) / dt).astype(int), 0, grid)
        b = np.concatenate([[0], b, [grid]])
        m = cm[b[1:]] - cm[b[:-1]]
        nc = np.where(m > 0, (cx[b[1:]] - cx[b[:-1]]) / np.maximum(m, 1e-300), c)
        if np.max(np.abs(nc - c)) < 1e-12:
            c = nc
            break
        c = nc
    c = (c - c[::-1]) / 2  # exactly symmetric, as codebook.rs
    return mx.array(c, dtype=mx.float32), mx.array((c[:-1] + c[1:]) / 2, dtype=mx.float32)


_books = {}


def turbo(x, bits, mean=None):
    d = x.shape[-1]
    if (d, bits) not in _books:
        _books[(d, bits)] = (splitmix_signs(d, SEED),) + codebook(d, bits)
    signs, levels, mids = _books[(d, bits)]
    x = x.astype(mx.float32)
    if mean is not None:
        x = x - mean
    n = mx.linalg.norm(x, axis=-1, keepdims=True)
    y = mx.hadamard_transform(x / mx.maximum(n, 1e-30) * signs)
    codes = (y[..., None] > mids).sum(-1)
    c = levels[codes]
    n = (n / mx.maximum(mx.linalg.norm(c, axis=-1, keepdims=True), 1e-30)).astype(mx.bfloat16).astype(mx.float32)
    out = mx.hadamard_transform(c) * signs * n
    return out + mean if mean is not None else out


def roundtrip(x, mode, mean=None):
    if mode == "none":
        return x
    if mode in ("q8", "q4", "q2"):
        b = int(mode[1])
        return mx.dequantize(*mx.quantize(x, group_size=64, bits=b), group_size=64, bits=b)
    if mode == "fp8":
        s = mx.maximum(mx.abs(x).max(-1, keepdims=True), 1e-30).astype(mx.float32) / 448
        return (mx.from_fp8(mx.to_fp8(x.astype(mx.float32) / s), mx.float32) * s).astype(x.dtype)
    if mode.startswith("turbo"):
        bits = int(mode[5])
        return turbo(x, bits, mean if mode.endswith("-c") else None).astype(x.dtype)
    raise SystemExit(f"unknown mode {mode}")


ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("text")
ap.add_argument("modes", nargs="+")
ap.add_argument("--tokens", type=int, default=1024)
ap.add_argument("--calib")
a = ap.parse_args()
model, tok = load(a.model)
ids = mx.array([tok.encode(open(a.text).read())[: a.tokens]])
state = {"mode": ("none", "none"), "layer": 0, "means": None, "record": None}


def patched(orig):
    def f(queries, keys, values, cache, scale, mask, **kw):
        l = state["layer"]
        state["layer"] += 1
        if state["record"] is not None:
            state["record"].append(keys.astype(mx.float32).mean(axis=2, keepdims=True))
        kmode, vmode = state["mode"]
        mean = state["means"][l] if state["means"] else None
        keys, values = roundtrip(keys, kmode, mean), roundtrip(values, vmode)
        return orig(queries, keys, values, cache=cache, scale=scale, mask=mask, **kw)

    return f


for m in (llama, qwen2, qwen3):
    m.scaled_dot_product_attention = patched(m.scaled_dot_product_attention)

if a.calib:
    state["record"] = []
    model(mx.array([tok.encode(open(a.calib).read())[: a.tokens]]))
    state["means"], state["record"] = state["record"], None


def ppl():
    state["layer"] = 0
    logits = model(ids).astype(mx.float32)
    lp = logits[0, :-1] - mx.logsumexp(logits[0, :-1], axis=-1, keepdims=True)
    nll = -mx.take_along_axis(lp, ids[0, 1:, None], axis=-1).mean()
    return math.exp(nll.item())


for mode in a.modes:
    k, _, v = mode.partition(":")
    state["mode"] = (k, v or "none")
    print(f"{mode:18} ppl {ppl():10.3f}", flush=True)
