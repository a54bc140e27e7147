#!/usr/bin/env python3
"""Goldens for gpt-oss (mlx-lm's `gpt_oss` model, GptOssForCausalLM), with
make_goldens.py's writer and recorder (run through it:
`make_goldens.py gpt_oss`).

- `gpt_oss-f32`: 4 layers whose `layer_types` are not the default
  alternation (sliding, full, full, sliding), an 8-token window (shorter than
  the 23- and 40-token prompts), learned per-head attention `sinks` (drawn
  with std 1, so the sink column takes a real share of the softmax), q/k/v/o
  biases, YaRN RoPE with gpt-oss's own `rope_scaling` (factor 32,
  beta_fast 32, beta_slow 1, original context 4096: a ramp over the 8
  frequencies of head_dim 16 and an mscale of 1.35 on q and k), 8 experts,
  top-2 routing (top-k of the router's logits, then a softmax over the k),
  experts with biases and the clamped SwiGLU of gpt-oss (`swiglu_oai`).
- `gpt_oss-q4-g64`: the same weights quantized by mlx-lm's `quantize_model`
  (affine 4-bit g64: every Linear, the Embedding, the switch layers), the
  router at 8 bits by the model's own `quant_predicate`.
- `gpt_oss-mxfp4-q8`: as mlx-community ships gpt-oss: the experts mxfp4
  (group 32), everything else affine 8-bit g64.
- `gpt_oss-default-f32`: the defaults: no `layer_types` (mlx-lm alternates
  sliding and full), no `rope_scaling`, top-3 of 4 experts, another window.

Each model is saved, reloaded by mlx-lm's `load_model` and recorded from
that. Besides make_goldens.py's three prompts the goldens have a 40-token
prompt: its prefill routes 39 x k >= 64 (token, expert) pairs, where mlx-lm's
SwitchGLU sorts them by expert, and it runs far past the window.
"""
import contextlib
import io

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

import make_goldens as mg
import mlx_lm.utils as lm_utils
from mlx_lm.models import gpt_oss

SINK_STD = 1.0

GPT_OSS_COMMON = {
    **{k: v for k, v in mg.COMMON.items() if k not in ("intermediate_size", "max_position_embeddings")},
    "model_type": "gpt_oss",
    "architectures": ["GptOssForCausalLM"],
    "rms_norm_eps": 1e-5,
    "rope_theta": 150000.0,
    # 64 so that group size 64 divides down_proj's input: mlx-lm quantizes it.
    "intermediate_size": 64,
    "max_position_embeddings": 131072,
    # Keys of the real configs that mlx-lm does not read (rmlx checks them).
    "attention_bias": True,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "initial_context_length": 4096,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.9,
}

# name: (config, seed, quantized variants)
GPT_OSS = {
    "gpt_oss": (
        {
            **GPT_OSS_COMMON,
            "num_hidden_layers": 4,
            "layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"],
            "sliding_window": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "experts_per_token": 2,
            # gpt-oss-20b/120b's own rope_scaling
            "rope_scaling": {
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "rope_type": "yarn",
                "truncate": False,
            },
        },
        9120,
        ["q4-g64", "mxfp4-q8"],
    ),
    "gpt_oss-default": (
        {
            **GPT_OSS_COMMON,
            "num_hidden_layers": 2,
            "sliding_window": 5,
            "num_local_experts": 4,
            "num_experts_per_tok": 3,
            "rope_scaling": None,
        },
        9121,
        [],
    ),
}

LONG_PROMPT = [(i * 37 + 11) % 256 for i in range(40)]


def build_f32(arch):
    """As make_goldens.build_f32, with the sinks drawn wider."""
    model, config, params = mg.build_f32(arch)
    mx.random.seed(mg.ARCHS[arch][2] + 1000)
    params = [
        (p, SINK_STD * mx.random.normal(v.shape, dtype=mx.float32) if p.endswith(".sinks") else v)
        for p, v in params
    ]
    assert sum(p.endswith(".sinks") for p, _ in params) == config["num_hidden_layers"]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model, config, params


def experts_mxfp4(path, module):
    """mlx-community's MXFP4-Q8 recipe: experts mxfp4, router 8-bit g64, the rest the default."""
    if ".mlp.experts." in path:
        return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    if path.endswith("router"):
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
    assert q["model.layers.0.mlp.router"] == {"group_size": 64, "bits": 8}, q
    if suffix == "mxfp4-q8":
        assert q["model.layers.0.mlp.experts.gate_proj"]["mode"] == "mxfp4", q
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
    """Writes every model of `family` ("gpt_oss"); returns their names."""
    assert family == "gpt_oss", family
    names = []
    for arch, (config, seed, quants) in GPT_OSS.items():
        mg.ARCHS[arch] = (gpt_oss, config, seed)
        model, config, params = build_f32(arch)
        variants = [(f"{arch}-f32", model, config)]
        for suffix in quants:
            qmodel, qconfig = quantize(arch, params, suffix)
            variants.append((f"{arch}-{suffix}", qmodel, qconfig))
        for name, m, cfg in variants:
            mx.eval(m.parameters())
            record(name, m, cfg)
            names.append(name)
    return names


# Not used by make(): a check that the window and the sinks change mlx-lm's
# result on these prompts (run by hand: `python -c "import gpt_oss_goldens as g; g.sensitivity()"`).
def sensitivity():
    import numpy as np

    mg.ARCHS["gpt_oss"] = (gpt_oss, GPT_OSS["gpt_oss"][0], GPT_OSS["gpt_oss"][1])
    model, config, params = build_f32("gpt_oss")
    x = mx.array([LONG_PROMPT])
    base = np.array(model(x)[0, -1])
    for what, edit in [
        ("no sinks", lambda p, v: mx.full(v.shape, -1e9) if p.endswith(".sinks") else v),
    ]:
        m = mg.clone("gpt_oss", [(p, edit(p, v)) for p, v in params])
        print(what, float(np.abs(np.array(m(x)[0, -1]) - base).max()))
    m = mg.clone("gpt_oss", params)
    m.model.window_size = 1000
    print("no window", float(np.abs(np.array(m(x)[0, -1]) - base).max()))
    _ = tree_flatten
