"""Gemma 3 multimodal golden (issue 15): a tiny random `gemma3` model built
with mlx-vlm's own classes (SigLIP tower + projector + gemma3_text language
model), saved in the layout mlx-vlm loads, reloaded through
`mlx_vlm.utils.load_model`, and what that model computes in float32.

Run from the repo root with the dev venv (mlx-vlm installed with --no-deps):
    .venv-dev/bin/python scripts/dev/gemma3_vision_golden.py

Writes
- tests/fixtures/models/gemma3-vision-tiny/: config.json, model.safetensors
  (float32, no lm_head: tied), preprocessor_config.json (Gemma3ImageProcessor,
  32x32);
- tests/fixtures/goldens/gemma3-vision-tiny/: golden.json (token ids,
  shapes, conventions) and little-endian f32 arrays:
  pixels.f32 [2, 3, 32, 32] (transformers' Gemma3ImageProcessorPil on
  tests/fixtures/images/rgb37x23.png and grey50x61.png),
  features.f32 [2, 4, 64] (per image, what replaces its 4 placeholder
  embeddings: the projector's output divided by sqrt(hidden_size), as
  mlx-vlm's prepare_inputs_for_multimodal merges it; the language model then
  scales the whole sequence by bf16(sqrt(text hidden))),
  logits_image.f32 [L, V] (prompt with both images, then the continuation),
  logits_text.f32 [L, V] (a text-only prompt, pixel_values None).

Generation in mlx-vlm (generate/ar.py) calls get_input_embeddings and then
language_model(inputs_embeds=...) without its 4-D padding mask, so
attention is causal (windowed on local layers) throughout, image tokens
included; the logits here are computed the same way.
"""
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from mlx_vlm.models import gemma3
from mlx_vlm.utils import load_model

sys.path.insert(0, str(Path(__file__).parent))
from vision_golden_common import save_model, write_golden  # noqa: E402

MODEL = Path("tests/fixtures/models/gemma3-vision-tiny")
GOLD = Path("tests/fixtures/goldens/gemma3-vision-tiny")

BOI, EOI, IMG, T = 256, 257, 262, 4  # <start_of_image>, <end_of_image>, <image_soft_token>, tokens per image

CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    # No top-level hidden_size, like Hugging Face's Gemma 3 configs: mlx-vlm's
    # ModelConfig then divides image features by sqrt(2048) (its default).
    "boi_token_index": BOI,
    "eoi_token_index": EOI,
    "image_token_index": IMG,
    "mm_tokens_per_image": T,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": [2],
    "text_config": {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 300,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "max_position_embeddings": 512,
        "mm_tokens_per_image": T,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "patch_size": 8,
        "image_size": 32,
        "num_channels": 3,
        "layer_norm_eps": 1e-6,
        "vision_use_head": False,
    },
    "torch_dtype": "float32",
}

PREPROCESSOR = {
    "image_processor_type": "Gemma3ImageProcessor",
    "processor_class": "Gemma3Processor",
    "do_resize": True,
    "size": {"height": 32, "width": 32},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
    "do_pan_and_scan": False,
    "image_seq_length": T,
}

IMAGES = ["tests/fixtures/images/rgb37x23.png", "tests/fixtures/images/grey50x61.png"]


def image_block():
    return [BOI] + [IMG] * T + [EOI]


# 21 prompt tokens (past the 8-token window) with both images, then 3 more.
PROMPT_IMAGE = [1, 40, 41] + image_block() + [50] + image_block() + [60, 61, 62, 63, 64]
CONTINUE_IMAGE = [70, 71, 72]
PROMPT_TEXT = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]


def build():
    mx.random.seed(1503)
    cfg = gemma3.ModelConfig.from_dict(CONFIG)
    cfg.text_config = gemma3.TextConfig.from_dict(CONFIG["text_config"])
    cfg.vision_config = gemma3.VisionConfig.from_dict(CONFIG["vision_config"])
    model = gemma3.Model(cfg)
    weights = {}
    for name, p in tree_flatten(model.parameters()):
        if name == "language_model.lm_head.weight":
            continue  # tied: mlx-vlm's sanitize copies embed_tokens
        if "vision_tower" in name and ("layer_norm" in name or "layernorm" in name):
            # LayerNorm: weight around 1, bias around 0
            v = (1.0 if name.endswith("weight") else 0.0) + 0.1 * mx.random.normal(p.shape)
        elif name.endswith("norm.weight"):
            v = 0.2 * mx.random.normal(p.shape)  # Gemma RMSNorm stores weight - 1
        elif name.endswith("mm_input_projection_weight"):
            v = 0.3 * mx.random.normal(p.shape)
        elif name.endswith("bias"):
            v = 0.05 * mx.random.normal(p.shape)
        elif "embed" in name:
            v = 0.5 * mx.random.normal(p.shape)
        else:
            v = p  # linears and the conv: mlx's own init
        weights[name] = v.astype(mx.float32)
    return weights


def pixels():
    proc = Gemma3ImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items() if k not in ("image_processor_type", "processor_class", "image_seq_length")})
    out = [np.asarray(proc(Image.open(p), return_tensors="np")["pixel_values"], dtype=np.float32)[0] for p in IMAGES]
    return np.stack(out)  # [2, 3, 32, 32]


def main():
    save_model(MODEL, build(), CONFIG, {"preprocessor_config.json": PREPROCESSOR})

    model = load_model(MODEL)  # mlx-vlm's own loading: config, sanitize, strict weights
    pv = pixels()
    pix = mx.array(pv)

    # The media encoder: tower + projector, as get_input_embeddings runs it.
    hidden, _, _ = model.vision_tower(pix.transpose(0, 2, 3, 1), output_hidden_states=True)
    proj = model.multi_modal_projector(hidden)  # [2, T, 64]
    merged = proj / (model.config.hidden_size ** 0.5)  # what prepare_inputs_for_multimodal scatters

    ids = mx.array([PROMPT_IMAGE + CONTINUE_IMAGE])
    emb = model.get_input_embeddings(ids, pix, mask=mx.ones(ids.shape)).inputs_embeds
    # The merged rows are exactly the features above (checked before the
    # language model, whose `h *= scale` updates `emb` in place).
    where = np.where(np.array(ids[0]) == IMG)[0]
    np.testing.assert_array_equal(np.array(emb[0])[where], np.array(merged).reshape(-1, merged.shape[-1]))
    logits_image = model.language_model(ids, inputs_embeds=emb).logits[0]

    tids = mx.array([PROMPT_TEXT])
    temb = model.get_input_embeddings(tids, None).inputs_embeds
    logits_text = model.language_model(tids, inputs_embeds=temb).logits[0]
    np.testing.assert_allclose(np.array(logits_text), np.array(model.language_model(tids).logits[0]), atol=1e-5)

    arrays = {"pixels": pv, "features": merged, "logits_image": logits_image, "logits_text": logits_text}
    meta = {
        "images": IMAGES,
        "pixels_shape": list(pv.shape),
        "features_shape": list(merged.shape),
        "prompt_image": PROMPT_IMAGE,
        "continue_image": CONTINUE_IMAGE,
        "prompt_text": PROMPT_TEXT,
        "vocab": CONFIG["text_config"]["vocab_size"],
        "image_token_index": IMG,
        "boi_token_index": BOI,
        "eoi_token_index": EOI,
        "mm_tokens_per_image": T,
        "feature_divisor": float(model.config.hidden_size ** 0.5),
    }
    write_golden(GOLD, arrays, meta, MODEL)

if __name__ == "__main__":
    main()
