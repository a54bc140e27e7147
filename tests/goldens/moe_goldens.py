#!/usr/bin/env python3
"""Goldens for the mixture-of-experts families, with make_goldens.py's
builder, quantizer, writer and recorder (run through it:
`make_goldens.py qwen3_moe`).

- `qwen3_moe-*`: mlx-lm's `qwen3_moe` model (Qwen3MoeForCausalLM): 8 experts,
  each layer's feed-forward a sparse MoE block or the dense MLP as
  `decoder_sparse_step` and `mlp_only_layers` say; the experts are
  mlx-lm's switch layers (`mlp.switch_mlp.{gate,up,down}_proj`, weight
  [experts, out, in]), which its quantizer quantizes too (`q4-g64`, `q8-g64`,
  `mxfp4`; the router `mlp.gate` at 8 bits, the model's own `quant_predicate`).

Each model is saved, reloaded by mlx-lm's `load_model` and recorded from that.
Besides make_goldens.py's three prompts the goldens have a 40-token prompt:
its prefill routes 39 tokens x k >= 64 (token, expert) pairs, where mlx-lm's
SwitchGLU sorts them by expert (`_gather_sort`).
"""
import contextlib
import io

import mlx.core as mx

import make_goldens as mg
import mlx_lm.utils as lm_utils
from mlx_lm.models import qwen3_moe

MOE_COMMON = {
    **mg.COMMON,
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "rms_norm_eps": 1e-6,
    "num_experts": 8,
    # 64 so that group size 64 divides down_proj's input: mlx-lm quantizes it.
    "moe_intermediate_size": 64,
    # Keys of the real configs that mlx-lm does not read (rmlx checks them).
    "rope_scaling": None,
    "use_sliding_window": False,
    "sliding_window": None,
    "output_router_logits": False,
}

# name: (config, seed, quantized variants)
MOE = {
    # layers 0 and 2 sparse, layer 1 dense (mlp_only_layers); top-2,
    # renormalised; tied head.
    "qwen3_moe": (
        {
            **MOE_COMMON,
            "num_hidden_layers": 3,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [1],
            "tie_word_embeddings": True,
        },
        6780,
        ["q4-g64", "q8-g64", "mxfp4"],
    ),
    # layers 1 and 3 sparse by decoder_sparse_step 2; top-3, scores not
    # renormalised; untied head.
    "qwen3_moe-nonorm": (
        {
            **MOE_COMMON,
            "num_hidden_layers": 4,
            "num_experts_per_tok": 3,
            "norm_topk_prob": False,
            "decoder_sparse_step": 2,
            "mlp_only_layers": [],
            "tie_word_embeddings": False,
        },
        6781,
        [],
    ),
}

LONG_PROMPT = [(i * 37 + 11) % 256 for i in range(40)]


def quantize_fp(name, params, mode):
    """Every Linear, switch layer and the Embedding in `mode` at MLX's group
    size for it; the router as the model's quant_predicate says."""
    model = mg.clone(name, params)
    config = mg.ARCHS[name][1]
    with contextlib.redirect_stdout(io.StringIO()):
        model, qconfig = lm_utils.quantize_model(model, dict(config), None, None, mode=mode)
    return model, qconfig


@contextlib.contextmanager
def prompts(extra):
    saved = mg.PROMPTS
    mg.PROMPTS = saved + extra
    try:
        yield
    finally:
        mg.PROMPTS = saved


def record(name, model, config):
    mg.save(name, model, config)
    # The golden comes from the files as mlx-lm's loader reads them back.
    model, _ = lm_utils.load_model(mg.MODELS_DIR / name)
    switch = sum(1 for _, m in model.named_modules() if "SwitchLinear" in type(m).__name__)
    with prompts([LONG_PROMPT]):
        min_margin, max_dev = mg.golden(name, model)
    bpw = lm_utils.compute_bits_per_weight(model)
    mg.log(
        f"{name:22s} {bpw:6.3f} bits/weight, {switch} switch layers, min top1-top2 "
        f"margin {min_margin:.2g}, one-pass-prefill max |dlogit| {max_dev:.2g}"
    )


def make(family):
    """Writes every model of `family` ("qwen3_moe"); returns their names."""
    assert family == "qwen3_moe", family
    names = []
    for arch, (config, seed, quants) in MOE.items():
        mg.ARCHS[arch] = (qwen3_moe, config, seed)
        model, config, params = mg.build_f32(arch)
        variants = [(f"{arch}-f32", model, config)]
        for suffix in quants:
            if suffix == "mxfp4":
                qmodel, qconfig = quantize_fp(arch, params, suffix)
            else:
                _, gs, bits, recipe = next(q for q in mg.QUANTS if q[0] == suffix)
                qmodel, qconfig = mg.quantize(arch, params, gs, bits, recipe)
            # mlx-lm's qwen3_moe quant_predicate: the router at 8 bits, group 64.
            assert qconfig["quantization"]["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}
            variants.append((f"{arch}-{suffix}", qmodel, qconfig))
        for name, m, cfg in variants:
            mx.eval(m.parameters())
            record(name, m, cfg)
            names.append(name)
    return names
