"""Dev script: dump real post-RoPE queries, keys and values of a small model
(mlx-lm) for the KV-quantization analysis (`cargo run -p rmlx-kv-quant
--example analysis -- DUMP`). Not used at run time.

usage: dump_kv.py MODEL_DIR TEXT_FILE OUT.safetensors [--tokens N] [--layers 0,5,..]
Writes q{l} [H, T, D], k{l} [K, T, D], v{l} [K, T, D] (float32) per layer.
"""
import argparse

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models import llama, qwen2, qwen3

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("text")
ap.add_argument("out")
ap.add_argument("--tokens", type=int, default=512)
ap.add_argument("--layers", default="")
a = ap.parse_args()

model, tok = load(a.model)
ids = tok.encode(open(a.text).read())[: a.tokens]
captured = []


def capture(orig):
    def f(queries, keys, values, cache, scale, mask, **kw):
        captured.append((queries[0], keys[0], values[0]))
        return orig(queries, keys, values, cache=cache, scale=scale, mask=mask, **kw)

    return f


for m in (llama, qwen2, qwen3):
    m.scaled_dot_product_attention = capture(m.scaled_dot_product_attention)

model(mx.array([ids]))
layers = [int(x) for x in a.layers.split(",")] if a.layers else range(len(captured))
out = {}
for l in layers:
    q, k, v = captured[l]
    out[f"q{l}"], out[f"k{l}"], out[f"v{l}"] = (x.astype(mx.float32) for x in (q, k, v))
mx.save_safetensors(a.out, out)
print(f"{len(ids)} tokens, {len(captured)} layers, q {captured[0][0].shape} k {captured[0][1].shape}")
