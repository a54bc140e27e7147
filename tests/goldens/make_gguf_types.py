#!/usr/bin/env python3
"""Small GGUFs with tensors of every GGML type llama.cpp's quantizations
produce, and the `gguf` package's own dequantized values, for
host/tests/convert_gguf_types.rs.

Usage: .venv-dev/bin/python tests/goldens/make_gguf_types.py [OUT_DIR]
       (default tests/fixtures/gguf_types; deterministic, seed 0)

Writes:
  types.gguf        for each TYPE: `q.TYPE` (2 x 256, in TYPE) and `ref.TYPE`
                    (F32, gguf.quants.dequantize of the same bytes).
  llama_types.gguf  a tiny llama (hidden 256, 2 layers, 2 heads of 16, 1 kv
                    head, ffn 32, vocab 32, no tokenizer) whose weight
                    matrices together use all 15 types (see LAYOUT).
  llama_unsupported.gguf  the same model with output.weight in IQ2_XXS,
                    which rmlx does not convert.

Types the package can quantize (BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are
quantized from random normal data; for the others (Q2_K..Q6_K, IQ4_NL,
IQ4_XS, IQ2_XXS) gguf-py has only a dequantizer, so their blocks are random
bytes with the float16 scale fields overwritten by small finite values
(every other bit pattern is a valid block).
"""
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

QUANTIZABLE = {T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}
# Byte offsets of each block's float16 scale fields, for hand-built blocks.
F16_FIELDS = {
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
    T.IQ4_NL: [0],
    T.IQ4_XS: [0],
    T.IQ2_XXS: [0],
}
ALL = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
       T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]

# (tensor, type) of llama_types.gguf; o_proj/down_proj have rows of 32
# elements, so they take the 32-element block types.
LAYOUT = {
    "token_embd.weight": T.IQ4_XS,
    "output.weight": T.Q8_0,
    "blk.0.attn_q.weight": T.Q2_K,
    "blk.0.attn_k.weight": T.Q3_K,
    "blk.0.attn_v.weight": T.Q4_0,
    "blk.0.attn_output.weight": T.Q4_1,
    "blk.0.ffn_gate.weight": T.Q5_0,
    "blk.0.ffn_up.weight": T.Q5_1,
    "blk.0.ffn_down.weight": T.Q8_0,
    "blk.1.attn_q.weight": T.BF16,
    "blk.1.attn_k.weight": T.F16,
    "blk.1.attn_v.weight": T.Q4_K,
    "blk.1.attn_output.weight": T.IQ4_NL,
    "blk.1.ffn_gate.weight": T.Q5_K,
    "blk.1.ffn_up.weight": T.Q6_K,
    "blk.1.ffn_down.weight": T.F32,
}
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 256, 2, 1, 16, 32, 32


def encode(rng, ty, rows, cols):
    """(bytes or array to write, float32 reference) for a rows x cols tensor."""
    x = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    if ty == T.F32:
        return x, x
    if ty == T.F16:
        h = x.astype(np.float16)
        return h, h.astype(np.float32)
    if ty in QUANTIZABLE:
        raw = gguf.quants.quantize(x, ty)
    else:
        block, size = gguf.GGML_QUANT_SIZES[ty]
        n_blocks = rows * cols // block
        raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
        for off in F16_FIELDS[ty]:
            d = rng.uniform(1e-3, 1e-2, n_blocks).astype(np.float16)
            raw[:, off:off + 2] = d.view(np.uint8).reshape(n_blocks, 2)
        raw = raw.reshape(rows, -1)
    return raw, gguf.quants.dequantize(raw, ty).astype(np.float32)


def add(w, name, ty, data):
    if ty in (T.F32, T.F16):
        w.add_tensor(name, data)
    else:
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=ty)


def write_types(out: Path, rng):
    w = gguf.GGUFWriter(str(out / "types.gguf"), "rmlx-test-types")
    for ty in ALL:
        raw, ref = encode(rng, ty, 2, 256)
        add(w, f"q.{ty.name}", ty, raw)
        w.add_tensor(f"ref.{ty.name}", ref)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def shape_of(name):
    """(rows, cols) of a llama tensor; cols is the contiguous dimension."""
    part = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
    return {
        "token_embd": (VOCAB, HIDDEN),
        "output": (VOCAB, HIDDEN),
        "attn_q": (HEADS * HEAD_DIM, HIDDEN),
        "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_output": (HIDDEN, HEADS * HEAD_DIM),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }[part]


def write_llama(path: Path, rng, layout):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("rmlx-test-llama-types")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    for name, ty in layout.items():
        raw, _ = encode(rng, ty, *shape_of(name))
        add(w, name, ty, raw)
    norm = np.ones(HIDDEN, dtype=np.float32)
    w.add_tensor("output_norm.weight", norm)
    for layer in range(2):
        w.add_tensor(f"blk.{layer}.attn_norm.weight", norm)
        w.add_tensor(f"blk.{layer}.ffn_norm.weight", norm)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "fixtures/gguf_types"
    out.mkdir(parents=True, exist_ok=True)
    write_types(out, np.random.default_rng(0))
    assert set(LAYOUT.values()) == set(ALL), "llama_types.gguf must use every type"
    write_llama(out / "llama_types.gguf", np.random.default_rng(1), LAYOUT)
    bad = dict(LAYOUT, **{"output.weight": T.IQ2_XXS})
    write_llama(out / "llama_unsupported.gguf", np.random.default_rng(2), bad)
    for f in sorted(out.glob("*.gguf")):
        print(f"{f} {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
