#!/usr/bin/env python3
"""Goldens for Gemma 4's text decoder (mlx-lm's `gemma4_text`), with
make_goldens.py's writer and recorder (run through it:
`make_goldens.py gemma4_text`).

- `gemma4_text-f32`: 6 layers, `layer_types` sliding, sliding, full,
  sliding, sliding, full with an 8-token window (shorter than the 23- and
  40-token prompts); sliding layers head size 16 with 2 K/V heads, full
  layers `global_head_dim` 32 with `attention_k_eq_v` (no v_proj: values are
  the raw keys) and 1 K/V head (`num_global_key_value_heads`); the full
  layers' RoPE `proportional` with `partial_rotary_factor` 0.25 (8 of 32
  dimensions rotate) and theta 1e6, the sliding ones default with theta 1e4;
  the last 2 layers share K/V (`num_kv_shared_layers`: layer 4 reads layer
  3's, layer 5 layer 2's) and have the double-wide MLP; per-layer inputs
  (`hidden_size_per_layer_input` 64); the MoE block beside the MLP (4
  experts, top 2, GELU experts, scaled router); `final_logit_softcapping`
  2.0, small enough to bend these logits; tied head.
- `gemma4_text-q4-g64`: the same weights quantized by mlx-lm's
  `quantize_model` (affine 4-bit g64; the router's `proj` at 8 bits by the
  model's own `quant_predicate`).
- `gemma4_text-mxfp4-q8`: the experts mxfp4 (group 32), everything else
  affine 8-bit g64.
- `gemma4_text-nomoe-bf16`: `gemma4_text`'s config without experts (MLX's
  CPU `gather_mm` takes float32 only), every float tensor cast to bfloat16
  (as `mlx_lm.convert --dtype bfloat16`), recorded in bfloat16 with a
  `KVCache` per layer (keys in position order; see `record`).
- `gemma4_text-dense-f32`: the other branches: no per-layer inputs, no
  experts, no KV sharing, no k_eq_v, one head size, `layer_types` from
  `sliding_window_pattern` 3, no soft-cap, an untied `lm_head`, and
  `rope_parameters` absent (mlx-lm's default: proportional 0.25 on full
  layers).

Weights are N(0, 0.1^2); norms, `layer_scalar`, the router's `scale` and
`per_expert_scale` 1 + N(0, 0.1^2). Each model is saved, reloaded by mlx-lm's
`load_model` and recorded from that; the goldens add a 40-token prompt (its
prefill routes 39 x 2 >= 64 (token, expert) pairs: SwitchGLU sorts them).
"""
import contextlib
import io

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import make_goldens as mg
import mlx_lm.utils as lm_utils
from mlx_lm.models import gemma4_text
from mlx_lm.models.cache import KVCache

BASE = {
    "model_type": "gemma4_text",
    "architectures": ["Gemma4ForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 6,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 512,
    "sliding_window": 8,
    "hidden_activation": "gelu_pytorch_tanh",
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

GEMMA4 = {
    "gemma4_text": (
        {
            **BASE,
            "layer_types": [
                "sliding_attention", "sliding_attention", "full_attention",
                "sliding_attention", "sliding_attention", "full_attention",
            ],
            "global_head_dim": 32,
            "attention_k_eq_v": True,
            "num_global_key_value_heads": 1,
            "rope_parameters": {
                "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
                "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
            },
            "num_kv_shared_layers": 2,
            "use_double_wide_mlp": True,
            "hidden_size_per_layer_input": 64,
            "vocab_size_per_layer_input": 256,
            "enable_moe_block": True,
            "num_experts": 4,
            "top_k_experts": 2,
            "moe_intermediate_size": 64,
            "final_logit_softcapping": 2.0,
            "tie_word_embeddings": True,
        },
        7410,
        ["f32", "q4-g64", "mxfp4-q8"],
    ),
    "gemma4_text-dense": (
        {
            **BASE,
            "num_hidden_layers": 4,
            "sliding_window_pattern": 3,
            "global_head_dim": 16,
            "num_kv_shared_layers": 0,
            "hidden_size_per_layer_input": 0,
            "vocab_size_per_layer_input": 256,
            "final_logit_softcapping": None,
            "tie_word_embeddings": False,
        },
        7411,
        ["f32"],
    ),
}
# gemma4_text without experts (MLX's CPU gather_mm takes float32 only), in
# bfloat16 as `mlx_lm.convert --dtype bfloat16` casts it.
GEMMA4["gemma4_text-nomoe"] = ({**GEMMA4["gemma4_text"][0], "enable_moe_block": False}, 7412, ["bf16"])

LONG_PROMPT = [(i * 37 + 11) % 256 for i in range(40)]

NEAR_ONE = ("norm.weight", ".layer_scalar", ".router.scale", ".router.per_expert_scale")


def build_f32(arch):
    module, config, seed = mg.ARCHS[arch]
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.random.seed(seed)
    params = []
    for path, v in tree_flatten(model.parameters()):
        if path.endswith(NEAR_ONE):
            w = 1.0 + mg.NORM_STD * mx.random.normal(v.shape, dtype=mx.float32)
        else:
            w = mg.WEIGHT_STD * mx.random.normal(v.shape, dtype=mx.float32)
        params.append((path, w))
    model.update(tree_unflatten(params))
    model.eval()
    mx.eval(model.parameters())
    return model, dict(config), params


def experts_mxfp4(path, module):
    """Experts mxfp4 (group 32), the router 8-bit g64, the rest the default."""
    if ".experts.switch_glu." in path:
        return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    if path.endswith("router.proj"):
        return {"group_size": 64, "bits": 8}
    return True


def quantize(arch, params, suffix):
    model = mg.clone(arch, params)
    config = dict(mg.ARCHS[arch][1])
    if suffix == "mxfp4-q8":
        kw = dict(group_size=64, bits=8, mode="affine", quant_predicate=experts_mxfp4)
    else:
        _, gs, bits, recipe = next(q for q in mg.QUANTS if q[0] == suffix)
        assert recipe is None
        kw = dict(group_size=gs, bits=bits, mode="affine")  # the model's quant_predicate
    with contextlib.redirect_stdout(io.StringIO()):
        model, qconfig = lm_utils.quantize_model(model, config, **kw)
    q = qconfig["quantization"]
    assert q["model.layers.0.router.proj"] == {"group_size": 64, "bits": 8}, q
    if suffix == "mxfp4-q8":
        assert q["model.layers.0.experts.switch_glu.gate_proj"]["mode"] == "mxfp4", q
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
    if name.endswith("-bf16"):
        # mlx-lm's RotatingKVCache keeps a sliding layer's keys in ring
        # order once it wraps, which changes bfloat16 rounding (one step of
        # the 7-token prompt by one ulp, 8.7e-3 relative); a KVCache per
        # layer (masked to the window by its make_mask) keeps them in
        # position order, as rmlx's caches do.
        n = model.args.num_hidden_layers - model.args.num_kv_shared_layers
        model.make_cache = lambda: [KVCache() for _ in range(n)]
    with prompts([LONG_PROMPT]):
        min_margin, max_dev = mg.golden(name, model)
    bpw = lm_utils.compute_bits_per_weight(model)
    mg.log(
        f"{name:24s} {bpw:6.3f} bits/weight, min top1-top2 margin {min_margin:.2g}, "
        f"one-pass-prefill max |dlogit| {max_dev:.2g}"
    )


def make(family):
    """Writes every model of `family` ("gemma4_text"); returns their names."""
    assert family == "gemma4_text", family
    names = []
    for arch, (config, seed, quants) in GEMMA4.items():
        mg.ARCHS[arch] = (gemma4_text, config, seed)
        model, config, params = build_f32(arch)
        variants = []
        for suffix in quants:
            if suffix == "f32":
                variants.append((f"{arch}-f32", model, config))
            elif suffix == "bf16":
                bf16 = mg.clone(arch, params)
                bf16.update(tree_map(lambda v: v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v, bf16.parameters()))
                variants.append((f"{arch}-bf16", bf16, {**config, "torch_dtype": "bfloat16"}))
            else:
                qmodel, qconfig = quantize(arch, params, suffix)
                variants.append((f"{arch}-{suffix}", qmodel, qconfig))
        for name, m, cfg in variants:
            mx.eval(m.parameters())
            record(name, m, cfg)
            names.append(name)
    return names


# Not used by make(): how much each feature moves mlx-lm's last logits on the
# long prompt (run by hand: `python -c "import gemma4_goldens as g; g.sensitivity()"`).
def sensitivity():
    import numpy as np

    arch = "gemma4_text"
    mg.ARCHS[arch] = (gemma4_text, GEMMA4[arch][0], GEMMA4[arch][1])
    model, config, params = build_f32(arch)
    x = mx.array([LONG_PROMPT])
    base = np.array(model(x)[0, -1])
    trials = {
        "no window": {"sliding_window": 1000},
        "no softcap": {"final_logit_softcapping": None},
        "full rope": {"rope_parameters": {**config["rope_parameters"], "full_attention": {"rope_theta": 1e6}}},
    }
    for what, edit in trials.items():
        mg.ARCHS[arch] = (gemma4_text, {**config, **edit}, 0)
        m = mg.clone(arch, params)
        print(what, float(np.abs(np.array(m(x)[0, -1]) - base).max()))
    mg.ARCHS[arch] = (gemma4_text, config, 0)
