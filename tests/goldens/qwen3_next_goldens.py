#!/usr/bin/env python3
"""Goldens for the gated DeltaNet hybrids, with make_goldens.py's builder,
quantizer, writer and recorder (run through it: `make_goldens.py qwen3_next`).

- `qwen3_next-*`: mlx-lm's `qwen3_next` model: 4 layers with
  full_attention_interval 2 (layers 0 and 2 gated DeltaNet, 1 and 3 gated
  full attention), 2 linear key heads and 4 value heads (so the recurrence
  repeats keys), conv kernel 4, partial RoPE (factor 0.25: 4 of 16 dims),
  8 experts top-2 renormalised plus a shared expert on layers 0, 2 and 3 and
  a dense MLP on layer 1 (`mlp_only_layers`), untied head; float32, and
  affine q4-g64 / q8-g64 from mlx-lm's quantizer (the router and
  `shared_expert_gate` at 8 bits, the model's own `quant_predicate`).
- `qwen3_5-*` and `qwen3_5_moe-*` (Qwen3.5 / 3.6, text model only): see
  TEXT35 below; tensors under `language_model.` as mlx-lm saves them.
  `make_goldens.py qwen3_next` writes all three families; `qwen3_5` or
  `qwen3_5_moe` only that one.

Each model is saved, reloaded by mlx-lm's `load_model` and recorded from
that. mlx-lm runs on the CPU here, so `gated_delta_update` takes its ops
path (`gated_delta_ops`). Besides make_goldens.py's three prompts (prefill,
then 8 decode steps that carry the recurrent state), each golden has a
`chunked` list: the 23-token prompt prefilled `prefill_step_size` tokens at a
time (11: two chunks, then the last token; 4: six chunks), which crosses the
state over chunk boundaries as a prefix-cache hit will.
"""
import contextlib
import io

import mlx.core as mx
import numpy as np

import make_goldens as mg
import mlx_lm.utils as lm_utils
from mlx_lm.generate import generate_step
from mlx_lm.models import qwen3_5, qwen3_5_moe, qwen3_next
from mlx_lm.models.cache import make_prompt_cache
from mlx.utils import tree_map_with_path

NEXT = {
    **mg.COMMON,
    "model_type": "qwen3_next",
    "architectures": ["Qwen3NextForCausalLM"],
    "num_hidden_layers": 4,
    "rms_norm_eps": 1e-6,
    "full_attention_interval": 2,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "partial_rotary_factor": 0.25,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [1],
    # 64 so that group size 64 divides the experts' down_proj input.
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "tie_word_embeddings": False,
    "rope_scaling": None,
    # Keys of the real configs that mlx-lm does not read (rmlx checks them).
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
}

# Qwen3.5 / 3.6 (mlx_lm.models.qwen3_5, qwen3_5_moe): the text model's keys
# under `text_config`, RoPE from `rope_parameters`, four DeltaNet input
# projections. The dense one: 4 layers with full_attention_interval 4 (three
# DeltaNet layers, then attention, as the real models), as many key as
# value heads, RoPE on half of head_dim, tied head. The MoE one: every layer
# MoE (8 experts top-2 + shared expert), interval 2, keys repeated to
# twice as many value heads, untied head.
TEXT35 = {
    **{k: v for k, v in mg.COMMON.items() if k not in ("rope_theta", "torch_dtype", "bos_token_id", "eos_token_id")},
    "model_type": "qwen3_5_text",
    "num_hidden_layers": 4,
    "rms_norm_eps": 1e-6,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "rope_parameters": {
        "rope_type": "default",
        "mrope_section": [1, 1, 2],
        "mrope_interleaved": True,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
    },
}
QWEN35 = {
    "model_type": "qwen3_5",
    "architectures": ["Qwen3_5ForConditionalGeneration"],
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "text_config": {
        **TEXT35,
        "full_attention_interval": 4,
        # 4 key = 4 value heads: value_dim 64, so group 64 divides out_proj's
        # input and mlx-lm quantizes every Linear.
        "linear_num_key_heads": 4,
        "linear_num_value_heads": 4,
        "tie_word_embeddings": True,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    },
}
QWEN35_MOE = {
    "model_type": "qwen3_5_moe",
    "architectures": ["Qwen3_5MoeForConditionalGeneration"],
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "text_config": {
        **TEXT35,
        "model_type": "qwen3_5_moe_text",
        "full_attention_interval": 2,
        "linear_num_value_heads": 4,
        "tie_word_embeddings": False,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
        "norm_topk_prob": True,
    },
}

# name: (module, config, seed, quantized variants)
HYBRIDS = {
    "qwen3_next": (qwen3_next, NEXT, 7890, ["q4-g64", "q8-g64"]),
    "qwen3_5": (qwen3_5, QWEN35, 7891, ["q4-g64", "q8-g64"]),
    "qwen3_5_moe": (qwen3_5_moe, QWEN35_MOE, 7892, ["q4-g64", "q8-g64"]),
}

CHUNKS = [11, 4]


def record_chunked(model, prompt, chunk):
    """make_goldens.record with `prefill_step_size` = chunk."""
    seen, dtypes = [], set()

    def capture(tokens, logits):
        dtypes.add(logits.dtype)
        seen.append(np.array(logits[0].astype(mx.float32)))
        return logits

    tokens = []
    for tok, _ in generate_step(
        mx.array(prompt, dtype=mx.uint32),
        model,
        max_tokens=mg.MAX_TOKENS,
        prompt_cache=make_prompt_cache(model),
        logits_processors=[capture],
        prefill_step_size=chunk,
    ):
        tokens.append(int(tok))
    logits = seen[: mg.MAX_TOKENS]
    margins = []
    for t, lg in zip(tokens, logits):
        if dtypes <= {mx.bfloat16, mx.float16}:
            # as make_goldens.record: mlx-lm's pick over the best other
            margins.append(float(lg[t] - np.delete(lg, t).max()))
            continue
        order = np.argsort(-lg, kind="stable")
        assert int(order[0]) == t, (t, int(order[0]))
        margins.append(float(lg[order[0]] - lg[order[1]]))
    return tokens, logits, margins


def record(name, model, config):
    mg.save(name, model, config)
    # The golden comes from the files as mlx-lm's loader reads them back.
    model, _ = lm_utils.load_model(mg.MODELS_DIR / name)
    min_margin, max_dev = mg.golden(name, model)
    path = mg.GOLDENS_DIR / f"{name}.json"
    doc = mg.json.loads(path.read_text())
    doc["chunked"] = []
    prompt = mg.PROMPTS[2]
    for chunk in CHUNKS:
        tokens, logits, margins = record_chunked(model, prompt, chunk)
        one = next(p for p in doc["prompts"] if p["prompt"] == prompt)
        dev = max(float(np.abs(np.array(a) - b).max()) for a, b in zip(one["logits"], logits))
        max_dev = max(max_dev, dev)
        min_margin = min(min_margin, min(margins))
        doc["chunked"].append(
            {
                "prompt": list(prompt),
                "chunk": chunk,
                "tokens": tokens,
                "logits": [[mg.r7(v) for v in lg] for lg in logits],
                "margins": [mg.r7(m) for m in margins],
            }
        )
    with open(path, "w") as f:
        mg.json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    bpw = lm_utils.compute_bits_per_weight(model)
    mg.log(
        f"{name:22s} {bpw:6.3f} bits/weight, min top1-top2 margin {min_margin:.2g}, "
        f"one-pass/chunked-prefill max |dlogit| {max_dev:.2g}"
    )


def quantize(arch, params, group_size, bits):
    """mlx-lm's quantizer at (group_size, bits), affine, with the model's own
    quant_predicate (make_goldens.quantize, without its dtype checks: the
    DeltaNet's conv1d, A_log and dt_bias stay float32)."""
    _, config, _ = mg.ARCHS[arch]
    model = mg.clone(arch, params)
    with contextlib.redirect_stdout(io.StringIO()):
        model, qconfig = lm_utils.quantize_model(model, dict(config), group_size, bits, mode="affine")
    mx.eval(model.parameters())
    return model, qconfig


def make(family):
    """Writes every model of `family` ("qwen3_next"); returns their names."""
    names = []
    for arch, (module, config, seed, quants) in HYBRIDS.items():
        if arch != family and family != "qwen3_next":
            continue
        mg.ARCHS[arch] = (module, config, seed)
        model, config, params = mg.build_f32(arch)
        variants = [(f"{arch}-f32", model, config)]
        # bfloat16 as mlx_lm.convert --dtype bfloat16 casts (its
        # cast_predicate: qwen3_5 keeps A_log float32); the dense one only
        # (MLX's CPU gather_mm, the experts, takes float32 only).
        bf16 = mg.clone(arch, params)
        keep = getattr(bf16, "cast_predicate", lambda _: True)
        bf16.update(
            tree_map_with_path(
                lambda k, v: v.astype(mx.bfloat16) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v,
                bf16.parameters(),
            )
        )
        if arch == "qwen3_5":
            variants.append((f"{arch}-bf16", bf16, {**config, "torch_dtype": "bfloat16"}))
        for suffix in quants:
            _, gs, bits, _ = next(q for q in mg.QUANTS if q[0] == suffix)
            qmodel, qconfig = quantize(arch, params, gs, bits)
            # the model's quant_predicate: the routers at 8 bits, group 64.
            q = qconfig["quantization"]
            root = "model" if arch == "qwen3_next" else "language_model.model"
            if arch != "qwen3_5":
                assert q[f"{root}.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}, q
                assert q[f"{root}.layers.0.mlp.shared_expert_gate"] == {"group_size": 64, "bits": 8}, q
            variants.append((f"{arch}-{suffix}", qmodel, qconfig))
        for name, m, cfg in variants:
            mx.eval(m.parameters())
            record(name, m, cfg)
            names.append(name)
    return names
