#!/usr/bin/env python3
"""Build tiny random MLX-format models and record golden greedy generations
with mlx-lm, the reference implementation.

Run from anywhere (after `bash scripts/dev-venv.sh`):

    .venv-dev/bin/python tests/goldens/make_goldens.py

Writes (and first deletes) for every model NAME:
    tests/fixtures/models/NAME/{config.json, model.safetensors, model.safetensors.index.json}
    tests/fixtures/goldens/NAME.json

Everything goes through mlx-lm's own code: its model classes
(mlx_lm.models.llama / qwen3), its quantizer (mlx_lm.utils.quantize_model),
its writers (mlx_lm.utils.save_model / save_config) and its generator
(mlx_lm.generate.generate_step with mlx_lm.models.cache.make_prompt_cache,
greedy). The script is deterministic: fixed seeds, CPU only.
"""

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx

# Before importing mlx_lm: mlx_lm.generate creates its generation stream on the
# default device at import time.
mx.set_default_device(mx.cpu)

import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

import mlx_lm.utils as lm_utils  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import llama, qwen2, qwen3  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = ROOT / "tests" / "fixtures" / "models"
GOLDENS_DIR = ROOT / "tests" / "fixtures" / "goldens"

MAX_TOKENS = 8
PROMPTS = [
    [42],
    [1, 17, 99, 128, 3, 200, 255],
    [
        1, 5, 9, 33, 76, 101, 12, 250, 64, 64, 7, 181,
        222, 0, 45, 139, 88, 17, 203, 91, 160, 30, 2,
    ],
]

COMMON = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "head_dim": 16,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "hidden_act": "silu",
    "attention_bias": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

ARCHS = {
    # name: (module, config, seed)
    "llama": (
        llama,
        {
            **COMMON,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "mlp_bias": False,
        },
        1234,
    ),
    "llama-tied": (
        llama,
        {
            **COMMON,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
            "mlp_bias": False,
        },
        2345,
    ),
    "qwen2": (
        qwen2,
        {
            **COMMON,
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
        },
        4567,
    ),
    "qwen3": (
        qwen3,
        {
            **COMMON,
            "model_type": "qwen3",
            "architectures": ["Qwen3ForCausalLM"],
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
        },
        3456,
    ),
}

# (suffix, group_size, bits, recipe). recipe None: every Linear/Embedding at
# (group_size, bits), mlx-lm's default. "embed8": embeddings (and the untied
# lm_head) at 8 bits, the rest at 4 (per-layer overrides in config.json).
# "mixed_3_6": mlx-lm's own built-in recipe (as `mlx_lm.convert --quant-predicate
# mixed_3_6`), which writes an override for every quantized layer.
QUANTS = [
    ("q2-g64", 64, 2, None),
    ("q3-g64", 64, 3, None),
    ("q4-g64", 64, 4, None),
    ("q5-g64", 64, 5, None),
    ("q6-g64", 64, 6, None),
    ("q8-g64", 64, 8, None),
    ("q4-g32", 32, 4, None),
    ("mixed", 64, 4, "embed8"),
    ("mixed-3-6", 64, 3, "mixed_3_6"),
]

WEIGHT_STD = 0.1  # logits std ~ 0.1 * sqrt(64) ~ 0.8: clear top-1 margins
NORM_STD = 0.1  # RMSNorm weights 1 + N(0, 0.1^2), so a missing weight shows


# Architectures added after the first set get float32 and two quantized
# formats only (the quantizers are the same code for every architecture).
QUANT_SUBSET = {"qwen2": ["q4-g64", "q8-g64"]}


def log(msg):
    print(f"[goldens] {msg}", flush=True)


def build_f32(arch):
    module, config, seed = ARCHS[arch]
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.random.seed(seed)
    params = []
    for path, v in tree_flatten(model.parameters()):
        if path.endswith("norm.weight"):
            w = 1.0 + NORM_STD * mx.random.normal(v.shape, dtype=mx.float32)
        else:
            w = WEIGHT_STD * mx.random.normal(v.shape, dtype=mx.float32)
        params.append((path, w))
    model.update(tree_unflatten(params))
    model.eval()
    mx.eval(model.parameters())
    return model, dict(config), params


def clone(arch, params):
    module, config, _ = ARCHS[arch]
    model = module.Model(module.ModelArgs.from_dict(config))
    model.update(tree_unflatten(params))
    model.eval()
    return model


def embed8_predicate(path, module):
    if path.endswith("embed_tokens") or path == "lm_head":
        return {"group_size": 64, "bits": 8, "mode": "affine"}
    return True


def quantize(arch, params, group_size, bits, recipe):
    _, config, _ = ARCHS[arch]
    model = clone(arch, params)
    if recipe is None:
        pred = None
    elif recipe == "embed8":
        pred = embed8_predicate
    else:
        from mlx_lm.convert import mixed_quant_predicate_builder

        pred = mixed_quant_predicate_builder(recipe, model, group_size)
    # quantize_model prints "[INFO] Quantized model with N bits per weight."
    with contextlib.redirect_stdout(io.StringIO()):
        model, qconfig = lm_utils.quantize_model(
            model, dict(config), group_size, bits, mode="affine", quant_predicate=pred
        )
    mx.eval(model.parameters())
    for path, v in tree_flatten(model.parameters()):
        if path.endswith(".scales") or path.endswith(".biases"):
            assert v.dtype == mx.float32, (path, v.dtype)
        elif path.endswith(".weight") and not path.endswith("norm.weight"):
            assert v.dtype == mx.uint32, (path, v.dtype)
        else:
            assert v.dtype == mx.float32, (path, v.dtype)
    return model, qconfig


def save(name, model, config, shard_bytes=None):
    out = MODELS_DIR / name
    if out.exists():
        shutil.rmtree(out)
    if shard_bytes is None:
        lm_utils.save_model(out, model)
    else:
        # mlx-lm 0.32.2's save_model takes no shard size; it calls the module
        # global make_shards(weights) with a whole-GiB limit. Swap in the same
        # greedy splitter with a byte limit, just for this call.
        orig = lm_utils.make_shards

        def tiny_shards(weights, max_file_size_gb=None):
            shards, size = [], 0
            for k, v in weights.items():
                if not shards or size + v.nbytes > shard_bytes:
                    shards.append({})
                    size = 0
                shards[-1][k] = v
                size += v.nbytes
            return shards

        lm_utils.make_shards = tiny_shards
        try:
            lm_utils.save_model(out, model)
        finally:
            lm_utils.make_shards = orig
    lm_utils.save_config(dict(config), config_path=out / "config.json")


def r7(x):
    return float(f"{float(x):.7g}")


def record(model, prompt):
    """Greedy generation exactly as mlx-lm does it; the processor only sees
    (and returns unchanged) the raw logits each token is chosen from."""
    seen, dtypes = [], set()

    def capture(tokens, logits):
        dtypes.add(logits.dtype)
        seen.append(np.array(logits[0].astype(mx.float32)))  # bf16 has no numpy dtype
        return logits

    cache = make_prompt_cache(model)
    tokens = []
    for tok, _ in generate_step(
        mx.array(prompt, dtype=mx.uint32),
        model,
        max_tokens=MAX_TOKENS,
        prompt_cache=cache,
        logits_processors=[capture],
    ):
        tokens.append(int(tok))
    # generate_step computes one step ahead; the first MAX_TOKENS are ours.
    logits = seen[:MAX_TOKENS]
    margins = []
    for t, lg in zip(tokens, logits):
        order = np.argsort(-lg, kind="stable")
        if dtypes <= {mx.bfloat16, mx.float16}:
            # mlx-lm takes the argmax of half logprobs (logits - logsumexp),
            # whose rounding can tie or swap near-equal logits: the margin is
            # then that of its pick over the best other, <= 0 where it differs.
            margins.append(float(lg[t] - np.delete(lg, t).max()))
            continue
        assert int(order[0]) == t, (t, int(order[0]))
        margins.append(float(lg[order[0]] - lg[order[1]]))
    return tokens, logits, margins


def full_prefill_logits(model, prompt, tokens):
    """The same continuation, but with the whole prompt in one forward pass
    (mlx-lm prefills prompt[:-1] and then runs the last token alone)."""
    cache = make_prompt_cache(model)
    out = []
    x = mx.array(prompt, dtype=mx.uint32)[None]
    for t in tokens:
        lg = model(x, cache=cache)[0, -1]
        out.append(np.array(lg.astype(mx.float32)))
        x = mx.array([[t]], dtype=mx.uint32)
    return out


def golden(name, model):
    doc = {"model": name, "prompts": []}
    min_margin, max_dev = float("inf"), 0.0
    for prompt in PROMPTS:
        tokens, logits, margins = record(model, prompt)
        alt = full_prefill_logits(model, prompt, tokens)
        max_dev = max(max_dev, max(float(np.abs(a - b).max()) for a, b in zip(alt, logits)))
        min_margin = min(min_margin, min(margins))
        doc["prompts"].append(
            {
                "prompt": list(prompt),
                "tokens": tokens,
                "logits": [[r7(v) for v in lg] for lg in logits],
                "margins": [r7(m) for m in margins],
            }
        )
    path = GOLDENS_DIR / f"{name}.json"
    with open(path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    return min_margin, max_dev


# Gemma 3 (mlx_lm.models.gemma3_text). Four layers with sliding_window_pattern
# 3 (local, local, global, local) and a window of 8 tokens, shorter than the
# longer prompts, so the window changes the result; query_pre_attn_scalar
# differs from head_dim, the local and global RoPE bases differ and the
# global layers have linear rope_scaling. Gemma 3 checkpoints ship without
# `lm_head` (tied: mlx-lm's sanitize pops it); "-untied" keeps one.
from mlx_lm.models import gemma3_text  # noqa: E402


class gemma3_text_tied:
    ModelArgs = gemma3_text.ModelArgs

    @staticmethod
    def Model(args):
        model = gemma3_text.Model(args)
        model.sanitize({})  # no lm_head.weight: tied, as mlx-lm loads it
        return model


GEMMA3_TEXT = {
    **{k: v for k, v in COMMON.items() if k != "hidden_act"},
    "model_type": "gemma3_text",
    "architectures": ["Gemma3ForCausalLM"],
    "hidden_size": 128,  # sqrt(128) is not a bfloat16: the embedding scale rounds
    "num_hidden_layers": 4,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    "query_pre_attn_scalar": 24,
    "sliding_window": 8,
    "sliding_window_pattern": 3,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "tie_word_embeddings": True,
}
ARCHS["gemma3_text"] = (gemma3_text_tied, GEMMA3_TEXT, 5670)
ARCHS["gemma3_text-untied"] = (gemma3_text, {**GEMMA3_TEXT, "tie_word_embeddings": False}, 5671)
QUANT_SUBSET["gemma3_text"] = ["q4-g64", "q8-g64"]
QUANT_SUBSET["gemma3_text-untied"] = []


def main():
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    GOLDENS_DIR.mkdir(parents=True, exist_ok=True)
    names = []
    # `make_goldens.py qwen2`: only the named architectures (the others' fixtures stay).
    only = sys.argv[1:] or list(ARCHS) + ["bitnet", "bonsai", "qwen3_moe", "gpt_oss", "qwen3_next", "gemma4_text"]
    for arch in only:
        if arch in ("bitnet", "bonsai"):  # lowbit_goldens.py: BitNet, Ternary Bonsai
            import lowbit_goldens

            names += lowbit_goldens.make(arch)
            continue
        if arch == "qwen3_moe":  # moe_goldens.py: mixture-of-experts families
            import moe_goldens

            names += moe_goldens.make(arch)
            continue
        if arch == "gpt_oss":  # gpt_oss_goldens.py: sinks, windows, YaRN, experts
            import gpt_oss_goldens

            names += gpt_oss_goldens.make(arch)
            continue
        if arch == "gemma4_text":  # gemma4_goldens.py: KV sharing, per-layer inputs, experts
            import gemma4_goldens

            names += gemma4_goldens.make(arch)
            continue
        if arch in ("qwen3_next", "qwen3_5", "qwen3_5_moe"):  # qwen3_next_goldens.py: gated DeltaNet hybrids
            import qwen3_next_goldens

            names += qwen3_next_goldens.make(arch)
            continue
        model, config, params = build_f32(arch)
        variants = [(f"{arch}-f32", model, config, None)]
        if arch == "llama":
            # 128 KiB shards: the f32 llama (~0.5 MiB) splits into 4+ files.
            variants.append((f"{arch}-f32-sharded", model, config, 128 << 10))
        for suffix, gs, bits, recipe in QUANTS:
            if arch in QUANT_SUBSET and suffix not in QUANT_SUBSET[arch]:
                continue
            qmodel, qconfig = quantize(arch, params, gs, bits, recipe)
            variants.append((f"{arch}-{suffix}", qmodel, qconfig, None))
        for name, m, cfg, shard in variants:
            save(name, m, cfg, shard)
            min_margin, max_dev = golden(name, m)
            names.append(name)
            bpw = lm_utils.compute_bits_per_weight(m)
            log(
                f"{name:22s} {bpw:6.3f} bits/weight, min top1-top2 margin "
                f"{min_margin:.2g}, one-pass-prefill max |dlogit| {max_dev:.2g}"
            )
    log(f"wrote {len(names)} models and goldens under {MODELS_DIR.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
