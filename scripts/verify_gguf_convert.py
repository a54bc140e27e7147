#!/usr/bin/env python3
"""Dev-only check of rmlx's GGUF -> MLX converter (host/src/convert).

    verify_gguf_convert.py GGUF MLX_DIR [--tokenizer] [--generate]

Default check: load GGUF with MLX's own reader (`mx.load(gguf,
return_metadata=True)`, which turns Q4_0/Q4_1/Q8_0 into MLX affine triples),
apply the llama q/k un-permutation (llama only), the Gemma norm offset
(llama.cpp stores Gemma's `*norm.weight` + 1; gemma/gemma2/gemma3 only) and
the GGUF -> HF name mapping independently of the Rust code, and assert that every tensor of the converted
safetensors has the same name set, dtype, shape and bytes; quantized triples
are also dequantized with mx.dequantize on both sides (max abs diff must be
0). Also checks config.json's quantization section against the tensor shapes.

--tokenizer: compare tokenizer.json (Python `tokenizers`) with llama.cpp's own
tokenizer for the GGUF (needs `llama_cpp`, i.e. pip llama-cpp-python) and with
transformers' GGUF tokenizer, on a set of strings.

--generate: load MLX_DIR with mlx-lm and greedy-generate a chat answer to
"What is the capital of France?" (must mention Paris).

Needs: pip install mlx mlx-lm (Linux: mlx[cpu]) tokenizers transformers gguf.
"""

import argparse
import glob
import json
import os
import re
import sys

import mlx.core as mx
import numpy as np

MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 2/3 have four norms per layer (Gemma 1's two are named as in llama).
GEMMA_MAP = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GEMMA = ("gemma", "gemma2", "gemma3")


def hf_name(name, arch="llama"):
    base, suffix = name.rsplit(".", 1)
    if base in TOP:
        return f"{TOP[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    table = dict(MAP, **GEMMA_MAP) if arch in ("gemma2", "gemma3") else MAP
    if not m or m.group(2) not in table:
        raise ValueError(f"unexpected GGUF tensor {name}")
    return f"model.layers.{m.group(1)}.{table[m.group(2)]}.{suffix}"


def unpermute(a, n_head):
    """Inverse of llama.cpp's permute (reshape(n_head, 2, hd/2).swapaxes(1, 2)) on rows."""
    rows = a.shape[0]
    hd = rows // n_head
    return a.reshape(n_head, hd // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def as_bytes(a):
    a = mx.contiguous(a)
    return np.array(a.view(mx.uint8)).tobytes()


def meta_int(meta, key):
    v = meta[key]
    return int(v.item() if hasattr(v, "item") else v)


def load_converted(mlx_dir):
    out = {}
    for f in sorted(glob.glob(os.path.join(mlx_dir, "model*.safetensors"))):
        arrays, meta = mx.load(f, return_metadata=True)
        assert meta.get("format") == "mlx", f"{f}: metadata {meta}"
        out.update(arrays)
    return out


def check_tensors(gguf, mlx_dir):
    ref, meta = mx.load(gguf, return_metadata=True)
    arch = meta["general.architecture"]
    assert arch == "llama" or arch in GEMMA, arch
    n_head = meta_int(meta, f"{arch}.attention.head_count")
    n_kv = meta_int(meta, f"{arch}.attention.head_count_kv") if f"{arch}.attention.head_count_kv" in meta else n_head

    expected = {}
    for name, a in ref.items():
        # MLX names quantized triples <base>.weight/.scales/.biases
        base, suffix = name.rsplit(".", 1)
        target = hf_name(base + ".weight", arch)[: -len(".weight")] + "." + suffix
        if arch in GEMMA:
            if base.endswith("norm"):
                a = a - mx.array(1, dtype=a.dtype)
        elif re.search(r"\.attn_q$", base):
            a = unpermute(a, n_head)
        elif re.search(r"\.attn_k$", base):
            a = unpermute(a, n_kv)
        expected[target] = a

    got = load_converted(mlx_dir)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]} extra {extra[:5]}"

    n_bytes = 0
    for k in sorted(expected):
        e, g = expected[k], got[k]
        if e.dtype == mx.float16 and g.dtype == mx.bfloat16:
            # MLX's reader turns BF16 into float16; the converter keeps bfloat16.
            assert e.shape == g.shape, k
            assert mx.allclose(e.astype(mx.float32), g.astype(mx.float32), rtol=1e-2, atol=1e-3).item(), k
            n_bytes += g.nbytes
            continue
        assert e.dtype == g.dtype, f"{k}: dtype {g.dtype} != MLX reader {e.dtype}"
        assert e.shape == g.shape, f"{k}: shape {g.shape} != MLX reader {e.shape}"
        assert as_bytes(e) == as_bytes(g), f"{k}: bytes differ"
        n_bytes += g.nbytes
    how = "Gemma norm - 1" if arch in GEMMA else "q/k un-permutation"
    print(f"tensors: {len(got)} tensors, {n_bytes} bytes: bit-identical to mx.load(gguf) (+ {how})")

    cfg = json.load(open(os.path.join(mlx_dir, "config.json")))
    q = cfg.get("quantization")
    assert q == cfg.get("quantization_config"), "quantization != quantization_config"
    n_q = 0
    max_diff = 0.0
    for k in sorted(got):
        if not k.endswith(".scales"):
            continue
        base = k[: -len(".scales")]
        w, s, b = got[base + ".weight"], got[k], got[base + ".biases"]
        in_dim = s.shape[-1] * 32
        bits = w.shape[-1] * 32 // in_dim
        entry = q.get(base, None)
        cfg_bits, cfg_gs = (entry["bits"], entry["group_size"]) if isinstance(entry, dict) else (q["bits"], q["group_size"])
        assert entry is not False, f"{base} quantized but config says false"
        assert (bits, 32) == (cfg_bits, cfg_gs), f"{base}: tensors say {bits} bits/group 32, config {cfg_bits}/{cfg_gs}"
        dg = mx.dequantize(w, s, b, group_size=32, bits=bits)
        ew, es, eb = expected[base + ".weight"], expected[k], expected[base + ".biases"]
        de = mx.dequantize(ew, es, eb, group_size=32, bits=bits)
        d = mx.max(mx.abs(dg.astype(mx.float32) - de.astype(mx.float32))).item()
        max_diff = max(max_diff, d)
        n_q += 1
    assert max_diff == 0.0, max_diff
    for k, v in (q or {}).items():
        if k in ("group_size", "bits", "mode"):
            continue
        if v is False:
            assert k + ".weight" in got and k + ".scales" not in got, k
        else:
            assert k + ".scales" in got, k
    print(f"quantized modules: {n_q}, dequantized max abs diff vs MLX reader = {max_diff}")
    print(f"config quantization: {json.dumps(q)}")


STRINGS = [
    "What is the capital of France?",
    "Hello world! How's it going?",
    "In 2024, 1,234,567 people paid $3.50 each.",
    "  leading spaces\tand\ttabs\n\nnew lines   ",
    "naïve café, Straße, 東京, Привет, emoji 🙂👍🏽",
    "def f(x):\n    return x**2  # comment",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll've done it; we'd, you're, it's",
    "",
    " ",
    "1234567890",
]


def check_tokenizer(gguf, mlx_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(mlx_dir, "tokenizer.json"))
    ours = {s: tok.encode(s, add_special_tokens=True).ids for s in STRINGS}
    for s in STRINGS:
        # without BOS/EOS: Gemma/Llama SentencePiece vocabularies add a BOS
        dec = tok.decode(tok.encode(s, add_special_tokens=False).ids, skip_special_tokens=False)
        assert dec == s, f"decode round trip: {s!r} -> {dec!r}"
    print(f"tokenizer.json: loads with tokenizers, round-trips {len(STRINGS)} strings")

    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp not installed: skipping llama.cpp comparison")
    else:
        llm = llama_cpp.Llama(model_path=gguf, vocab_only=True, verbose=False)
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))) if hasattr(
            llama_cpp, "llama_vocab_get_add_bos") else False
        for s in STRINGS:
            ref = llm.tokenize(s.encode(), add_bos=add_bos, special=True)
            assert ours[s] == ref, f"llama.cpp differs on {s!r}:\n ours {ours[s]}\n llama.cpp {ref}"
        print(f"tokenizer.json == llama.cpp tokenization on {len(STRINGS)} strings")

    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf)), gguf_file=os.path.basename(gguf))
    except Exception as e:  # noqa: BLE001
        print(f"transformers GGUF tokenizer unavailable: {e}")
    else:
        diffs = [s for s in STRINGS if hf(s)["input_ids"] != ours[s]]
        print(f"transformers GGUF tokenizer agrees on {len(STRINGS) - len(diffs)}/{len(STRINGS)} strings"
              + (f"; differs on {diffs!r} (transformers has no per-digit split for this pre-tokenizer)" if diffs else ""))

    from transformers import AutoTokenizer

    t2 = AutoTokenizer.from_pretrained(mlx_dir)
    assert [t2(s)["input_ids"] for s in STRINGS] == [ours[s] for s in STRINGS], "transformers(MLX_DIR) differs"
    chat = t2.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    print(f"transformers loads MLX_DIR tokenizer identically; chat template renders {chat!r}")


def generate(mlx_dir):
    from mlx_lm import generate as gen, load
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(mlx_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = gen(model, tokenizer, prompt=prompt, max_tokens=48, sampler=make_sampler(temp=0.0))
    print(f"mlx-lm greedy answer: {text!r}")
    assert "Paris" in text, "answer does not mention Paris"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("mlx_dir")
    ap.add_argument("--tokenizer", action="store_true")
    ap.add_argument("--generate", action="store_true")
    a = ap.parse_args()
    check_tensors(a.gguf, a.mlx_dir)
    if a.tokenizer:
        check_tokenizer(a.gguf, a.mlx_dir)
    if a.generate:
        generate(a.mlx_dir)
    print("OK")


if __name__ == "__main__":
    sys.exit(main())
