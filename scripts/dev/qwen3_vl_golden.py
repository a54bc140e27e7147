"""Qwen3-VL end to end (issue 15): a tiny random `qwen3_vl` model built with
mlx-vlm 0.7.10's own classes (vision tower with deepstack mergers + the
qwen3 language model with interleaved M-RoPE and deepstack injection),
saved in the layout mlx-vlm loads (`language_model.*`, `vision_tower.*`),
reloaded through `mlx_vlm.load` (its own Qwen3VLProcessor with the numpy
Qwen3-VL image processor), and what it computes in float32 for a chat
prompt with an image.

Run from the repo root with the dev venv:
    .venv-dev/bin/python scripts/dev/qwen3_vl_golden.py

Writes
- tests/fixtures/models/qwen3_vl-tiny/: config.json (text_config and
  vision_config nested, as Hugging Face and mlx-vlm write them),
  model.safetensors, preprocessor_config.json (patch 2, temporal patch 2,
  merge 2, `size.{shortest,longest}_edge` 64 / 1024 as real Qwen3-VL
  checkpoints write them, mean/std 0.5), tokenizer.json (word level, Qwen's
  special tokens), tokenizer_config.json (a Qwen-style chat template whose
  image part renders `<|vision_start|><|image_pad|><|vision_end|>`);
- tests/fixtures/images/q3a24x16.png: a 24x16 RGB image (no resize: grid
  (1, 8, 12) -> 4 x 6 = 24 image tokens);
- tests/fixtures/goldens/qwen3_vl-serve/: golden.json (per case the rendered
  prompt, mlx-vlm's expanded ids, its M-RoPE positions [3, L] and rope
  delta, the last-position logits, `stream_generate`'s greedy tokens with
  top-5 (id, logprob) per step), and per case `<case>.pixels.f32` (the
  processor's normalised image [3, H, W], checked to patchify to its
  pixel_values) and `<case>.logits.f32` (every prompt position's logits
  [L, V]) for the plugin-level test.
"""
import copy
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from qwen_vl_golden_common import (  # noqa: E402
    IMAGES, IMG, VEND, VID, VSTART, chat_inputs, greedy_top5, random_weights, write_tokenizer)
from vision_golden_common import save_model, versions, write_json  # noqa: E402

MODEL = Path("tests/fixtures/models/qwen3_vl-tiny")
GOLD = Path("tests/fixtures/goldens/qwen3_vl-serve")
STEPS = 6

PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "do_resize": True,
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
    "size": {"shortest_edge": 64, "longest_edge": 1024},
    "patch_size": 2,
    "temporal_patch_size": 2,
    "merge_size": 2,
}

TEXT = {
    "model_type": "qwen3_vl_text",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "vocab_size": 300,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rope_scaling": {"rope_type": "default", "mrope_interleaved": True, "mrope_section": [2, 3, 3]},
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
}

VISION = {
    "model_type": "qwen3_vl",
    "depth": 3,
    "hidden_size": 16,
    "intermediate_size": 32,
    "out_hidden_size": 32,
    "num_heads": 2,
    "patch_size": 2,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_channels": 3,
    "num_position_embeddings": 16,
    "deepstack_visual_indexes": [0, 1],
    "hidden_act": "gelu_pytorch_tanh",
}

CONFIG = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "model_type": "qwen3_vl",
    "text_config": TEXT,
    "vision_config": VISION,
    "image_token_id": IMG,
    "video_token_id": VID,
    "vision_start_token_id": VSTART,
    "vision_end_token_id": VEND,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

CASES = {
    "image_a": ["what is in this picture", "q3a24x16.png", "describe it please"],
}


def build():
    from mlx_vlm.models import qwen3_vl

    mx.random.seed(int(os.environ.get("SEED", "1531")))
    # A deep copy: mlx-vlm's TextConfig renames rope_type to type in place.
    cfg = qwen3_vl.ModelConfig.from_dict(copy.deepcopy(CONFIG))
    return random_weights(qwen3_vl.Model(cfg))


def write_files(weights):
    save_model(MODEL, weights, CONFIG, {"preprocessor_config.json": PREPROCESSOR})
    write_tokenizer(MODEL)
    y, x = np.mgrid[0:16, 0:24]
    a = np.stack([(x * 11 + y * 3) % 256, y * 15, (x * y * 5) % 256], -1).astype(np.uint8)
    Image.fromarray(a, "RGB").save(IMAGES / "q3a24x16.png")


def normalised(path, proc):
    """The processor's image before patchify: [3, H, W] (no resize here)."""
    ip = proc.image_processor
    img = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1).astype(np.float32) * ip.rescale_factor
    mean = np.array(ip.image_mean, np.float32)[:, None, None]
    std = np.array(ip.image_std, np.float32)[:, None, None]
    return (img - mean) / std


def patchify(img, ps=2, tps=2, ms=2):
    c, h, w = img.shape
    p = np.repeat(img[None, None], tps, axis=1).reshape(1, 1, tps, c, h // ps // ms, ms, ps, w // ps // ms, ms, ps)
    return p.transpose(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(-1, c * tps * ps * ps)


def chat_case(name, model, proc, parts):
    prompt, images, inputs, ids, grid = chat_inputs(proc, parts)
    pixels = normalised(images[0], proc)
    assert np.abs(patchify(pixels) - np.array(inputs["pixel_values"])).max() < 1e-6, "pixels differ"
    pixels.astype("<f4").tofile(GOLD / f"{name}.pixels.f32")
    pos, delta = model.language_model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"])
    out = model(inputs["input_ids"], pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    logits = np.array(out.logits[0].astype(mx.float32))
    logits.astype("<f4").tofile(GOLD / f"{name}.logits.f32")
    tokens, top5 = greedy_top5(model, proc, prompt, images, STEPS)
    return {"parts": parts, "prompt": prompt, "prompt_ids": ids, "image_grid_thw": grid,
            "image_tokens": [g[0] * g[1] * g[2] // 4 for g in grid], "pixels_shape": list(pixels.shape),
            "positions": np.array(pos[:, 0]).astype(int).tolist(), "rope_delta": int(np.array(delta).reshape(-1)[0]),
            "logits_last": [float(x) for x in logits[-1]], "tokens": tokens, "top5": top5}


def main():
    from mlx_vlm import load

    write_files(build())
    model, proc = load(str(MODEL))
    GOLD.mkdir(parents=True, exist_ok=True)
    cases = {name: chat_case(name, model, proc, parts) for name, parts in CASES.items()}
    for name, c in cases.items():
        print(name, len(c["prompt_ids"]), c["image_grid_thw"], c["rope_delta"], c["tokens"], c["top5"][0][:3])
    write_json(GOLD / "golden.json", {"steps": STEPS, "cases": cases, **versions()})
    print("sizes:", {f: os.path.getsize(MODEL / f) for f in sorted(os.listdir(MODEL))})


if __name__ == "__main__":
    main()
