#!/usr/bin/env python3
"""Mixture-of-experts checkpoints in the Hugging Face layout (experts stored
one by one), against mlx-lm: `python tests/goldens/hf_moe_goldens.py`.

For each architecture a tiny random model is built with transformers' own
class (`Qwen3MoeForCausalLM`, `Qwen3NextForCausalLM`), float32, and saved
with `save_pretrained`, which writes the Hub's layout:
`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight` [out, in]
(and for qwen3_next the Hub's conv1d [C, 1, K] and zero-centred RMSNorm
weights). config.json is written with the keys of the real Hub configs
(Qwen/Qwen3-30B-A3B, Qwen/Qwen3-Next-80B-A3B-Instruct: flat `num_experts`,
`rope_theta`, ...) rather than transformers 5's renamed ones
(`num_local_experts`, `rope_parameters`), which mlx-lm 0.32.2 cannot read.
An HF-style `model.safetensors.index.json` is added (as check_goldens.py
expects one).

- `NAME-hf-f32`: that directory. mlx-lm's `load_model` reads it (its
  `sanitize` stacks the experts into `switch_mlp.*` [E, out, in]; for
  qwen3_next it also moves conv1d to [C, K, 1] and adds 1 to the norms) and
  the golden is recorded from that model with make_goldens.py's recorder
  (logits and greedy tokens of its three prompts plus a 40-token prompt
  whose prefill routes >= 64 (token, expert) pairs, so mlx-lm sorts them).
  transformers' own logits on the same prompt are checked against mlx-lm's
  (the two implementations agree on the layout's meaning).
- `NAME-hf-mlx-f32`: the same model as mlx-lm's `save_model` writes it
  after its sanitize (the layout `mlx_lm.convert` produces). No golden file
  of its own: host/tests/arch_hf_moe.rs compares it, and `rmlx convert`'s
  output of the HF directory, against the `-hf-f32` golden and tensor by
  tensor.

Sizes: hidden 32, 4 heads of 8 (2 KV heads), vocab 256, 4 experts of
intermediate 16, top-2 renormalised; a few hundred KB per directory.
"""
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_goldens as mg  # noqa: E402  (sets MLX's default device to the CPU)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import mlx_lm.utils as lm_utils  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import (  # noqa: E402
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

LONG_PROMPT = [(i * 37 + 11) % 256 for i in range(40)]
STD = 0.1

BASE = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 64,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}

# name: (transformers config class, model class, Hub-style config.json, seed,
#        the zero-centred (1 + w) RMSNorm weights' suffixes)
MODELS = {
    # layers 0 and 2 sparse, 1 dense (mlp_only_layers)
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        {
            **BASE,
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "num_hidden_layers": 3,
            "mlp_only_layers": [1],
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": 3,
        },
        9101,
        (),
    ),
    # layers 0 and 2 gated DeltaNet, 1 and 3 full attention; every layer
    # sparse with a shared expert
    "qwen3_next": (
        Qwen3NextConfig,
        Qwen3NextForCausalLM,
        {
            **BASE,
            "architectures": ["Qwen3NextForCausalLM"],
            "model_type": "qwen3_next",
            "num_hidden_layers": 4,
            "mlp_only_layers": [],
            "shared_expert_intermediate_size": 16,
            "full_attention_interval": 2,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "linear_conv_kernel_dim": 4,
            "partial_rotary_factor": 0.25,
            "layer_types": ["linear_attention", "full_attention"] * 2,
        },
        9102,
        ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight", "q_norm.weight", "k_norm.weight"),
    ),
}


def build(arch):
    cfg_cls, model_cls, config, seed, centred = MODELS[arch]
    hf_cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    if "partial_rotary_factor" in config:
        hf_cfg["rope_parameters"]["partial_rotary_factor"] = config["partial_rotary_factor"]
    model = model_cls(cfg_cls(**hf_cfg)).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = STD * torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight") and not any(name.endswith(s) for s in centred):
                noise += 1.0  # plain RMSNorm: weight * x
            p.copy_(noise)
    return model, config


def write_hf(arch, model, config, out):
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    for f in out.iterdir():
        if f.name not in ("model.safetensors",):
            f.unlink()
    with open(out / "config.json", "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = sorted(f.keys())
        size = sum(f.get_tensor(k).numel() * 4 for k in keys)
    experts = [k for k in keys if ".mlp.experts." in k]
    assert experts and all(k.split(".mlp.experts.")[1].split(".")[0].isdigit() for k in experts), experts[:4]
    index = {"metadata": {"total_size": size}, "weight_map": {k: "model.safetensors" for k in keys}}
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def check_transformers(model, mlx_model):
    """transformers' logits of the 23-token prompt equal mlx-lm's (on the HF dir)."""
    prompt = mg.PROMPTS[2]
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0].numpy()
    got = np.array(mlx_model(mx.array([prompt]))[0])
    dev = float(np.abs(got - want).max())
    assert dev < 1e-4, dev
    return dev


def make(arch):
    torch_model, config = build(arch)
    name = f"{arch}-hf-f32"
    hf_dir = mg.MODELS_DIR / name
    write_hf(arch, torch_model, config, hf_dir)
    # mlx-lm reads the HF directory through its sanitize
    model, cfg = lm_utils.load_model(hf_dir)
    dev = check_transformers(torch_model, model)
    saved = mg.PROMPTS
    mg.PROMPTS = saved + [LONG_PROMPT]
    try:
        min_margin, max_dev = mg.golden(name, model)
    finally:
        mg.PROMPTS = saved
    mg.log(f"{name:22s} min top1-top2 margin {min_margin:.2g}, one-pass-prefill max |dlogit| {max_dev:.2g}, "
           f"transformers vs mlx-lm max |dlogit| {dev:.2g}")
    # the same model in mlx-lm's own layout (what mlx_lm.convert writes)
    mlx_name = f"{arch}-hf-mlx-f32"
    mg.save(mlx_name, model, dict(config))
    stacked = [k for k in json.loads((mg.MODELS_DIR / mlx_name / "model.safetensors.index.json").read_text())["weight_map"]
               if "switch_mlp" in k]
    assert stacked, "mlx-lm's layout stacks the experts"
    mg.log(f"{mlx_name:22s} {len(stacked)} stacked expert tensors")
    return [name, mlx_name]


def main(argv):
    names = []
    for arch in argv or list(MODELS):
        names += make(arch)
    mg.log(f"wrote {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
