#!/usr/bin/env python3
"""Whole-model goldens for the BitNet and ParoQuant weight formats: tiny random
llama / qwen3 checkpoints in each format's layout (hidden 64, 2 layers, the
make_goldens.py configs and f32 weights), and the logits and greedy tokens of
the reference implementation on them.

    .venv-dev/bin/python tests/goldens/make_wquant_model_goldens.py

Writes (and first deletes) tests/fixtures/wquant-models/NAME/{config.json,
model.safetensors, model.safetensors.index.json} and
tests/fixtures/wquant-models/NAME.json (the make_goldens.py golden format).

BitNet (`quantization_config.quant_method: bitnet`): mlx-lm 0.32.2 applies
BitNet to any architecture, not only `model_type: bitnet` (rmlx has no bitnet
architecture: llama plus sub-norms and ReLU²): `load_model` sees the
quant_method and `bitnet_quantize` turns every `nn.Linear` not named in
`modules_to_not_convert` into a `BitLinear`. The checkpoint is written by
mlx-lm's `save_model` from such a model with random ternary weights, and the
golden comes from the model mlx-lm's own `load_model` builds from those files.
BitLinear's forward is a Metal-only kernel, so on this machine
`BitLinear.__call__` is make_bitnet_goldens.py's transcription of it
(`kernel_reference`).

ParoQuant (`quant_method: paroquant`): the layout ParoQuant's MLX loader
(z-lab/paroquant, backends/mlx/load.py) builds: rotated Linear layers carry
affine `weight`/`scales`/`biases` plus `theta`, `pairs`, `channel_scales`;
`embed_tokens`/`lm_head` are stored dense and quantized to affine (config's
bits/group size) at load. The paroquant package is not installed; the loader's
steps are reproduced here (patch modules that have `.theta`, load strictly,
`nn.quantize` the embedding and lm_head) and the rotated layer is
make_paroquant_goldens.py's `rotate_reference` (its Metal kernel transcribed)
followed by `mx.quantized_matmul`, as `RotateQuantizedLinear` does. Each
layer's dense weight W is stored as Q(W · M⁻¹), M the layer's activation
transform, so the model stays close to the f32 one.

Everything is float32 (weight_scale included), so the comparison is tight.
"""

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_goldens as mg  # noqa: E402  (sets the CPU default device)
import make_bitnet_goldens as mb  # noqa: E402
import make_paroquant_goldens as mp  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

import mlx_lm.utils as lm_utils  # noqa: E402
from mlx_lm.models.bitlinear_layers import BitLinear, bitnet_quantize  # noqa: E402

OUT = mg.ROOT / "tests" / "fixtures" / "wquant-models"
rng = np.random.default_rng(5150)

# name: (arch, quantization_config)
BITNET = {
    # untied lm_head kept dense (as Hugging Face BitNet checkpoints do), divide by the scale
    "llama-bitnet": ("llama", {"quant_method": "bitnet", "linear_class": "bitlinear",
                               "modules_to_not_convert": ["lm_head"]}),
    # tied embedding, multiply by the scale (microsoft/bitnet-b1.58-2B-4T's class)
    "qwen3-bitnet-auto": ("qwen3", {"quant_method": "bitnet", "linear_class": "autobitlinear"}),
}
PAROQUANT = {
    # untied: embed_tokens and lm_head both quantized at load
    "llama-paroquant": ("llama", {"quant_method": "paroquant", "bits": 4, "group_size": 64, "krot": 8}),
    # tied, q_norm/k_norm, 4 rounds, group size 32
    "qwen3-paroquant": ("qwen3", {"quant_method": "paroquant", "bits": 4, "group_size": 32, "krot": 4}),
}


def save(name, model, config):
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    lm_utils.save_model(out, model)
    lm_utils.save_config(dict(config), config_path=out / "config.json")
    return out


def write_golden(name, model):
    doc = {"model": name, "prompts": []}
    min_margin = float("inf")
    for prompt in mg.PROMPTS:
        tokens, logits, margins = mg.record(model, prompt)
        min_margin = min(min_margin, min(margins))
        doc["prompts"].append({"prompt": list(prompt), "tokens": tokens,
                               "logits": [[mg.r7(v) for v in lg] for lg in logits],
                               "margins": [mg.r7(m) for m in margins]})
    with open(OUT / f"{name}.json", "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    return min_margin


# ---- BitNet ----

BitLinear.__call__ = lambda self, x: mb.kernel_reference(self, x)


def make_bitnet(name, arch, qc):
    _, _, params = mg.build_f32(arch)
    _, base, _ = mg.ARCHS[arch]
    model = mg.clone(arch, params)
    model = bitnet_quantize(model, qc)
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not isinstance(m, BitLinear):
            continue
        ternary = rng.integers(-1, 2, size=(m.out_features, m.in_features)).astype(np.int8)
        m.weight = mx.array(mb.pack_weights(ternary))
        # effective weights c * t with c ~ 0.1 / sqrt(2/3): the f32 model's weight std (0.1)
        c = rng.uniform(0.7, 1.3) * mg.WEIGHT_STD / np.sqrt(2 / 3)
        value = 1.0 / c if m.invert_weight_scales else c
        m.weight_scale = mx.array([value], dtype=mx.float32)
    mx.eval(model.parameters())
    config = {**base, "quantization_config": qc}
    out = save(name, model, config)
    # The golden: the model mlx-lm's own loader makes of the files.
    loaded, _ = lm_utils.load_model(out)
    assert sum(isinstance(m, BitLinear) for _, m in loaded.named_modules()) == 7 * 2  # lm_head stays dense
    return loaded


# ---- ParoQuant ----

class RotateLinear(nn.Module):
    """RotateQuantizedLinear's forward: rotate (Metal kernel transcribed), then quantized_matmul."""

    def __init__(self, din, dout, group_size, bits, krot):
        super().__init__()
        self.group_size, self.bits = group_size, bits
        self.weight = mx.zeros((dout, din * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((dout, din // group_size))
        self.biases = mx.zeros((dout, din // group_size))
        self.theta = mx.zeros((krot, din // 2))
        self.pairs = mx.zeros((krot, din), dtype=mx.int16)
        self.channel_scales = mx.zeros((1, din))

    def __call__(self, x):
        r = mp.rotate_reference(x, np.array(self.pairs), np.array(self.theta), self.channel_scales, self.group_size)
        return mx.quantized_matmul(r, self.weight, scales=self.scales, biases=self.biases, transpose=True,
                                   group_size=self.group_size, bits=self.bits)


def rotated_tensors(w, group, bits, krot):
    """ParoQuant tensors for dense w [out, in]: random rotations/scales, weights Q(w M^-1)."""
    dout, din = w.shape
    pairs = mp.random_pairs(krot, din, group)
    theta = rng.uniform(-np.pi, np.pi, size=(krot, din // 2)).astype(np.float32)
    cs = rng.uniform(0.5, 2.0, size=(1, din)).astype(np.float32)
    # rotate_reference maps each row x to M x; on the identity's rows it gives M^T.
    mt = np.array(mp.rotate_reference(mx.eye(din), pairs, theta, mx.array(cs), group), dtype=np.float64)
    w2 = (np.array(w, dtype=np.float64) @ np.linalg.inv(mt.T)).astype(np.float32)
    weight, scales, biases = mx.quantize(mx.array(w2), group_size=group, bits=bits)
    return {"weight": weight, "scales": scales, "biases": biases, "theta": mx.array(theta),
            "pairs": mx.array(pairs), "channel_scales": mx.array(cs)}


def paroquant_load(out, config):
    """ParoQuant's MLX loader, for the layout written here (weights already MLX affine)."""
    qc = config["quantization_config"]
    group, bits = qc["group_size"], qc["bits"]
    module, _, _ = mg.ARCHS[config["_arch"]]
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = mx.load(str(out / "model.safetensors"))
    for prefix in sorted(k.removesuffix(".theta") for k in weights if k.endswith(".theta")):
        parent, leaf = prefix.rsplit(".", 1)
        owner = model
        for part in parent.split("."):
            owner = owner[int(part)] if isinstance(owner, list) else getattr(owner, part)
        old = getattr(owner, leaf)
        setattr(owner, leaf, RotateLinear(old.weight.shape[1], old.weight.shape[0], group, bits,
                                          weights[f"{prefix}.theta"].shape[0]))
    model.load_weights(list(weights.items()), strict=True)
    nn.quantize(model, group, bits, mode="affine",
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and (p.endswith("embed_tokens") or p.endswith("lm_head")))
    model.eval()
    mx.eval(model.parameters())
    return model


def make_paroquant(name, arch, qc):
    _, _, params = mg.build_f32(arch)
    _, base, _ = mg.ARCHS[arch]
    model = mg.clone(arch, params)
    group, bits, krot = qc["group_size"], qc["bits"], qc["krot"]
    tensors = dict(tree_flatten(model.parameters()))
    saved = {}
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(m, nn.Linear) and path != "lm_head":
            for k, v in rotated_tensors(m.weight, group, bits, krot).items():
                saved[f"{path}.{k}"] = v
            tensors.pop(f"{path}.weight")
    saved.update(tensors)
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), saved, metadata={"format": "mlx"})
    index = {"metadata": {"total_size": sum(v.nbytes for v in saved.values())},
             "weight_map": {k: "model.safetensors" for k in sorted(saved)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n")
    config = {**base, "quantization_config": qc}
    lm_utils.save_config(dict(config), config_path=out / "config.json")
    return paroquant_load(out, {**config, "_arch": arch})


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (arch, qc) in BITNET.items():
        model = make_bitnet(name, arch, qc)
        mg.log(f"{name:20s} min top1-top2 margin {write_golden(name, model):.2g}")
    for name, (arch, qc) in PAROQUANT.items():
        model = make_paroquant(name, arch, qc)
        mg.log(f"{name:20s} min top1-top2 margin {write_golden(name, model):.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
