"""Qwen2.5-VL end to end (issue 15): a tiny random `qwen2_5_vl` model built
with mlx-vlm 0.7.10's own classes (vision tower + qwen2 language model with
M-RoPE), saved in the layout mlx-vlm loads (`language_model.*`,
`vision_tower.*`), reloaded through `mlx_vlm.load` (its own processor:
Qwen2_5_VLProcessor with the numpy Qwen-VL image processor), and what it
computes in float32 for chat prompts with images.

Run from the repo root with the dev venv:
    .venv-dev/bin/python scripts/dev/qwen2_5_vl_golden.py

Writes
- tests/fixtures/models/qwen2_5_vl-tiny/: config.json, model.safetensors,
  preprocessor_config.json (Qwen2VLImageProcessor: patch 2, temporal patch 2,
  merge 2, min/max pixels 64 / 1024, CLIP mean/std), tokenizer.json (word
  level, Qwen's special tokens), tokenizer_config.json (a Qwen-style chat
  template whose image part renders `<|vision_start|><|image_pad|><|vision_end|>`);
- tests/fixtures/images/qwa24x16.png, qwb24x16.png: two 24x16 RGB images
  (no resize: 24 x 16 is a multiple of patch * merge = 4 inside the pixel
  range; grid (1, 8, 12) -> 4 x 6 = 24 image tokens each);
- tests/fixtures/goldens/qwen2_5_vl-serve/golden.json: per chat case the
  rendered prompt, the ids mlx-vlm's processor expands it to, the image
  token counts, the prompt's last-position logits (`logits_last`, f32 as
  a list) and mlx-vlm `stream_generate`'s greedy tokens with the top-5
  (id, logprob) of every step (the decode steps use mlx-vlm's rope delta).
"""
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from qwen_vl_golden_common import (  # noqa: E402
    IMAGES, IMG, VEND, VID, VSTART, chat_inputs, greedy_top5, random_weights, write_tokenizer)
from vision_golden_common import save_model, versions, write_json  # noqa: E402

MODEL = Path("tests/fixtures/models/qwen2_5_vl-tiny")
GOLD = Path("tests/fixtures/goldens/qwen2_5_vl-serve")
STEPS = 6

PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "do_resize": True,
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
    "min_pixels": 64,
    "max_pixels": 1024,
    "patch_size": 2,
    "temporal_patch_size": 2,
    "merge_size": 2,
}

CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "vocab_size": 300,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "image_token_id": IMG,
    "video_token_id": VID,
    "vision_start_token_id": VSTART,
    "vision_end_token_id": VEND,
    "eos_token_id": 2,
    "torch_dtype": "float32",
    "vision_config": {
        "model_type": "qwen2_5_vl",
        "depth": 2,
        "hidden_size": 16,
        "intermediate_size": 32,
        "out_hidden_size": 64,
        "num_heads": 2,
        "patch_size": 2,
        "spatial_patch_size": 2,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "window_size": 8,
        "fullatt_block_indexes": [1],
        "hidden_act": "silu",
    },
}

CASES = {
    "image_a": ["what is in this picture", "qwa24x16.png", "describe it please"],
    "image_b": ["what is in this picture", "qwb24x16.png", "describe it please"],
}


def build():
    from mlx_vlm.models import qwen2_5_vl

    mx.random.seed(int(__import__("os").environ.get("SEED", "1525")))
    cfg = qwen2_5_vl.ModelConfig.from_dict(dict(CONFIG))
    cfg.text_config = qwen2_5_vl.TextConfig.from_dict(dict(CONFIG))
    cfg.vision_config = qwen2_5_vl.VisionConfig.from_dict(CONFIG["vision_config"])
    return random_weights(qwen2_5_vl.Model(cfg))


def write_files(weights):
    save_model(MODEL, weights, CONFIG, {"preprocessor_config.json": PREPROCESSOR})
    write_tokenizer(MODEL)
    rng = np.random.default_rng(1525)
    y, x = np.mgrid[0:16, 0:24]
    a = np.stack([x * 10, y * 15, (x * y * 3) % 256], -1).astype(np.uint8)
    Image.fromarray(a, "RGB").save(IMAGES / "qwa24x16.png")
    b = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(b, "RGB").save(IMAGES / "qwb24x16.png")


def chat_case(model, proc, parts):
    prompt, images, inputs, ids, grid = chat_inputs(proc, parts)
    out = model(inputs["input_ids"], pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    logits = np.array(out.logits[0, -1].astype(mx.float32))
    tokens, top5 = greedy_top5(model, proc, prompt, images, STEPS)
    return {"parts": parts, "prompt": prompt, "prompt_ids": ids, "image_grid_thw": grid,
            "image_tokens": [g[0] * g[1] * g[2] // 4 for g in grid],
            "logits_last": [float(x) for x in logits], "tokens": tokens, "top5": top5}


def main():
    from mlx_vlm import load

    write_files(build())
    model, proc = load(str(MODEL))
    # mlx-vlm loads every tensor we wrote (strict): nothing left unused.
    cases = {name: chat_case(model, proc, parts) for name, parts in CASES.items()}
    for name, c in cases.items():
        print(name, len(c["prompt_ids"]), c["image_grid_thw"], c["tokens"], c["top5"][0][:3])
    GOLD.mkdir(parents=True, exist_ok=True)
    write_json(GOLD / "golden.json", {"steps": STEPS, "cases": cases, **versions()})
    import os
    print("sizes:", {f: os.path.getsize(MODEL / f) for f in sorted(os.listdir(MODEL))})


if __name__ == "__main__":
    main()
