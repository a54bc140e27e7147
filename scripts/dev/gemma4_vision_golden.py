"""Gemma 4 multimodal golden (issue 15): a tiny random `gemma4` model built
with mlx-vlm's own classes (vision tower + `embed_vision` + gemma4 language
model; no audio), saved in the layout mlx-vlm loads, reloaded through
`mlx_vlm.utils.load_model`, and what that model computes in float32.

Run from the repo root with the dev venv (mlx-vlm 0.7.10 installed):
    .venv-dev/bin/python scripts/dev/gemma4_vision_golden.py

Writes
- tests/fixtures/models/gemma4-vision-tiny/: config.json, model.safetensors
  (float32; clipped linears with finite bounds in the tower, standardize on);
- tests/fixtures/goldens/gemma4-vision-tiny/: golden.json (token ids,
  shapes, conventions) and little-endian f32 arrays:
  pixels.f32 [2, 3, 16, 24] (random in [0, 1), fed directly: mlx-vlm's
  processor rescales to [0, 1] without normalising),
  features.f32 [2, 6, 64] (per image, what replaces its 6 placeholder
  embeddings: `embed_vision(vision_tower(pixels))`; mlx-vlm scatters them
  *after* the embedding scale, unlike Gemma 3),
  logits_image.f32 [L, V] (prompt with both images, then the continuation),
  logits_text.f32 [L, V] (a text-only prompt, pixel_values None).

A 16x24 image with patch 4 is a 4x6 patch grid (24 patches), pooled 2x2 to
2x3 = 6 soft tokens per image. Attention in the language model is causal
(windowed on sliding layers) over image tokens too: mlx-vlm's `Model.__call__`
without `mm_token_type_ids` does not apply the bidirectional vision overlay.
"""
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_vlm.models import gemma4
from mlx_vlm.utils import load_model

sys.path.insert(0, str(Path(__file__).parent))
from vision_golden_common import save_model, write_golden  # noqa: E402

MODEL = Path("tests/fixtures/models/gemma4-vision-tiny")
GOLD = Path("tests/fixtures/goldens/gemma4-vision-tiny")

BOI, EOI, IMG, AUD, T = 288, 289, 290, 291, 6  # boi, eoi, image soft token, audio token, tokens per image

CONFIG = {
    "architectures": ["Gemma4ForConditionalGeneration"],
    "model_type": "gemma4",
    "image_token_id": IMG,
    "audio_token_id": AUD,
    "boi_token_id": BOI,
    "eoi_token_id": EOI,
    "vocab_size": 300,
    "hidden_size": 64,
    "pad_token_id": 0,
    "eos_token_id": [1],
    "vision_soft_tokens_per_image": T,
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "gemma4_text",
        "hidden_size": 64,
        "intermediate_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "vocab_size": 300,
        "vocab_size_per_layer_input": 300,
        "hidden_size_per_layer_input": 8,
        "num_kv_shared_layers": 2,
        "rms_norm_eps": 1e-6,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "max_position_embeddings": 512,
        "final_logit_softcapping": 30.0,
        "use_double_wide_mlp": False,
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
    },
    "vision_config": {
        "model_type": "gemma4_vision",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "rms_norm_eps": 1e-6,
        "patch_size": 4,
        "pooling_kernel_size": 2,
        "position_embedding_size": 16,
        "default_output_length": T,
        "use_clipped_linears": True,
        "standardize": True,
        "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"},
        "hidden_activation": "gelu_pytorch_tanh",
    },
    "torch_dtype": "float32",
}

H, W = 16, 24


def image_block():
    return [BOI] + [IMG] * T + [EOI]


# 23 prompt tokens (past the 8-token window) with both images, then 3 more.
PROMPT_IMAGE = [2, 40, 41] + image_block() + [50] + image_block() + [60, 61, 62, 63]
CONTINUE_IMAGE = [70, 71, 72]
PROMPT_TEXT = [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]


def build():
    mx.random.seed(1504)
    cfg = gemma4.ModelConfig.from_dict(CONFIG)
    cfg.text_config = gemma4.TextConfig.from_dict(CONFIG["text_config"])
    cfg.vision_config = gemma4.VisionConfig.from_dict(CONFIG["vision_config"])
    model = gemma4.Model(cfg)
    weights = {}
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("lm_head.weight"):
            continue  # tied
        if name.endswith(("input_min", "output_min")):
            v = mx.array(-0.6 if "mlp" in name else -2.0)  # finite: some values clip
        elif name.endswith(("input_max", "output_max")):
            v = mx.array(0.6 if "mlp" in name else 2.0)
        elif name.endswith("norm.weight") or name.endswith("std_scale") or name.endswith("layer_scalar"):
            v = 1.0 + 0.2 * mx.random.normal(p.shape)  # Gemma 4 norms use weight as stored
        elif name.endswith("std_bias"):
            v = 0.1 * mx.random.normal(p.shape)
        elif "position_embedding_table" in name:
            v = 0.5 * mx.random.normal(p.shape)
        elif "embed_tokens" in name:
            v = 0.5 * mx.random.normal(p.shape)
        else:
            v = p  # linears: mlx's own init
        weights[name] = v.astype(mx.float32)
    return weights


def main():
    weights = build()
    save_model(MODEL, weights, CONFIG)

    model = load_model(MODEL)  # mlx-vlm's own loading: config, sanitize, strict weights
    # Keep only what mlx-vlm loaded (its sanitize drops shared layers' K/V).
    kept = dict(tree_flatten(model.parameters()))
    dropped = sorted(set(weights) - set(kept))
    if dropped:
        print("not loaded by mlx-vlm, removed:", dropped)
        weights = {k: v for k, v in weights.items() if k in kept}
        mx.save_safetensors(str(MODEL / "model.safetensors"), weights, metadata={"format": "mlx"})
        model = load_model(MODEL)

    rng = np.random.default_rng(1504)
    pv = rng.random((2, 3, H, W), dtype=np.float32)
    pix = mx.array(pv)

    feats = model.encode_image(pix)  # [1, 2*T, D]: both images' tokens concatenated
    feats = feats.reshape(2, T, -1)

    ids = mx.array([PROMPT_IMAGE + CONTINUE_IMAGE])
    logits_image = model(ids, pixel_values=pix).logits[0]
    tids = mx.array([PROMPT_TEXT])
    logits_text = model(tids).logits[0]

    arrays = {"pixels": pv, "features": feats, "logits_image": logits_image, "logits_text": logits_text}
    meta = {
        "pixels_shape": list(pv.shape),
        "features_shape": list(feats.shape),
        "prompt_image": PROMPT_IMAGE,
        "continue_image": CONTINUE_IMAGE,
        "prompt_text": PROMPT_TEXT,
        "vocab": CONFIG["text_config"]["vocab_size"],
        "image_token_id": IMG,
        "boi_token_id": BOI,
        "eoi_token_id": EOI,
        "tokens_per_image": T,
    }
    write_golden(GOLD, arrays, meta, MODEL)

if __name__ == "__main__":
    main()
