#!/usr/bin/env python3
"""Reload every fixture model from disk with mlx-lm's own loader and check that
greedy generation reproduces its golden file (tokens exactly, logits within
1e-4 absolute + 1e-5 relative, the goldens being rounded to 7 digits).

This proves the files under tests/fixtures/models/ are what mlx-lm reads (config
parsing, per-layer quantization overrides, sharded index) and that the goldens
match them.

    .venv-dev/bin/python tests/goldens/check_goldens.py [NAME ...]
"""

import json
import sys
from pathlib import Path

import mlx.core as mx

mx.set_default_device(mx.cpu)

import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402

import bitlinear_cpu  # noqa: E402

bitlinear_cpu.install()  # mlx-lm's BitLinear kernel is Metal-only (bitnet-* models)

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = ROOT / "tests" / "fixtures" / "models"
GOLDENS_DIR = ROOT / "tests" / "fixtures" / "goldens"
ATOL, RTOL = 1e-4, 1e-5


def generate(model, prompt, n):
    seen = []

    def capture(tokens, logits):
        seen.append(np.array(logits[0].astype(mx.float32)))  # bf16 has no numpy dtype
        return logits

    toks = [
        int(t)
        for t, _ in generate_step(
            mx.array(prompt, dtype=mx.uint32),
            model,
            max_tokens=n,
            prompt_cache=make_prompt_cache(model),
            logits_processors=[capture],
        )
    ]
    return toks, seen[:n]


def name_is_mixed(config):
    q = config.get("quantization") or {}
    return any(isinstance(v, dict) for v in q.values())


def check_quant_layout(model, config):
    """Every quantized module has the bits/group_size config.json says."""
    q = config.get("quantization")
    n = 0
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            assert q is not None, f"{path} quantized but config has no quantization"
            want = q.get(path, q)
            assert (m.bits, m.group_size) == (want["bits"], want["group_size"]), (
                path,
                m.bits,
                m.group_size,
                want,
            )
            assert m.mode == want.get("mode", "affine"), (path, m.mode, want)
            if m.mode == "affine":
                # float32 from mlx-lm's quantizer; float16 in Ternary Bonsai's files
                assert m.scales.dtype in (mx.float32, mx.float16) and m.biases.dtype == m.scales.dtype
            else:  # mxfp4 / mxfp8 / nvfp4: uint8 scales, no biases
                assert m.scales.dtype == mx.uint8 and m.get("biases") is None
            n += 1
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            # A layer a recipe left dense is simply absent from the config
            # (make_fp_goldens.py's mixed-fp leaves one o_proj dense).
            assert q is None or name_is_mixed(config), f"{path} not quantized but config has quantization"
    return n


def check(name):
    golden = json.loads((GOLDENS_DIR / f"{name}.json").read_text())
    model_dir = MODELS_DIR / name
    model, config = load_model(model_dir)
    if name == "gemma4_text-nomoe-bf16":  # recorded with KVCache (gemma4_goldens.record)
        from mlx_lm.models.cache import KVCache

        n = model.args.num_hidden_layers - model.args.num_kv_shared_layers
        model.make_cache = lambda: [KVCache() for _ in range(n)]
    nq = check_quant_layout(model, config)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert all((model_dir / f).exists() for f in files), files
    worst = 0.0
    for p in golden["prompts"]:
        toks, logits = generate(model, p["prompt"], len(p["tokens"]))
        assert toks == p["tokens"], (name, p["prompt"], toks, p["tokens"])
        for got, want in zip(logits, p["logits"]):
            want = np.array(want, dtype=np.float32)
            err = np.abs(got - want)
            assert np.all(err <= ATOL + RTOL * np.abs(want)), (name, float(err.max()))
            worst = max(worst, float(err.max()))
    print(
        f"[check] {name:22s} ok: {len(files)} file(s), {nq} quantized modules, "
        f"max |dlogit| {worst:.2g}"
    )


def main(argv):
    names = argv or sorted(p.stem for p in GOLDENS_DIR.glob("*.json"))
    if not names:
        print("[check] no goldens; run make_goldens.py first")
        return 1
    failed = 0
    for name in names:
        try:
            check(name)
        except Exception as e:  # report every model, then fail
            failed += 1
            print(f"[check] {name:22s} FAILED: {e!r}")
    print(f"{len(names) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
