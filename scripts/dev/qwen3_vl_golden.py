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
from mlx.utils import tree_flatten
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from vision_golden_common import save_model, versions, write_json  # noqa: E402

MODEL = Path("tests/fixtures/models/qwen3_vl-tiny")
GOLD = Path("tests/fixtures/goldens/qwen3_vl-serve")
IMAGES = Path("tests/fixtures/images")
STEPS = 6

VSTART, VEND, IMG, VID = 290, 291, 292, 293
SPECIAL = [(0, "<|endoftext|>"), (1, "<|im_start|>"), (2, "<|im_end|>"), (3, "<unk>"),
           (VSTART, "<|vision_start|>"), (VEND, "<|vision_end|>"), (IMG, "<|image_pad|>"), (VID, "<|video_pad|>")]
WORDS = ["user", "assistant", "system", "what", "is", "in", "this", "picture", "describe", "it", "please", "and",
         "the", "colour"]

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
    "{% if p.type == 'image' or p.type == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p.type == 'text' %}{{ p.text }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

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


def tokenizer_json():
    vocab = {s: i for i, s in SPECIAL}
    vocab.update({w: 4 + i for i, w in enumerate(WORDS)})
    ids = dict(SPECIAL)
    vocab.update({f"w{i}": i for i in range(4 + len(WORDS), 300) if i not in ids})
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in SPECIAL]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}


def build():
    from mlx_vlm.models import qwen3_vl

    mx.random.seed(int(os.environ.get("SEED", "1531")))
    # A deep copy: mlx-vlm's TextConfig renames rope_type to type in place.
    cfg = qwen3_vl.ModelConfig.from_dict(copy.deepcopy(CONFIG))
    model = qwen3_vl.Model(cfg)
    weights = {}
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight") \
                or "layernorm" in name:
            v = 1.0 + 0.1 * mx.random.normal(p.shape)
        elif "embed_tokens" in name:
            v = 0.15 * mx.random.normal(p.shape)
        elif name.endswith("bias"):
            v = 0.1 * mx.random.normal(p.shape)
        elif "pos_embed" in name:
            v = 0.3 * mx.random.normal(p.shape)
        else:
            v = 0.3 * mx.random.normal(p.shape) if p.ndim > 2 else p + 0.02 * mx.random.normal(p.shape)
        weights[name] = v.astype(mx.float32)
    return weights


def write_files(weights):
    save_model(MODEL, weights, CONFIG, {"preprocessor_config.json": PREPROCESSOR})
    write_json(MODEL / "tokenizer.json", tokenizer_json())
    write_json(MODEL / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
        "chat_template": TEMPLATE,
    })
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
    from mlx_vlm import stream_generate
    from mlx_vlm.utils import prepare_inputs

    content = [{"type": "image"} if p.endswith(".png") else {"type": "text", "text": p} for p in parts]
    images = [str(IMAGES / p) for p in parts if p.endswith(".png")]
    prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
    inputs = prepare_inputs(proc, images=images, prompts=prompt)
    ids = [int(t) for t in np.array(inputs["input_ids"][0])]
    grid = [[int(v) for v in g] for g in np.array(inputs["image_grid_thw"])]
    pixels = normalised(images[0], proc)
    assert np.abs(patchify(pixels) - np.array(inputs["pixel_values"])).max() < 1e-6, "pixels differ"
    pixels.astype("<f4").tofile(GOLD / f"{name}.pixels.f32")
    pos, delta = model.language_model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"])
    out = model(inputs["input_ids"], pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    logits = np.array(out.logits[0].astype(mx.float32))
    logits.astype("<f4").tofile(GOLD / f"{name}.logits.f32")
    tokens, top5 = [], []
    for r in stream_generate(model, proc, prompt, image=images, max_tokens=STEPS, temperature=0.0):
        if len(tokens) == STEPS:
            break
        lp = np.array(r.logprobs, dtype=np.float32).reshape(-1)
        order = np.argsort(-lp, kind="stable")[:5]
        tokens.append(int(r.token))
        top5.append([[int(t), float(lp[t])] for t in order])
        margin = float(lp[order[0]] - lp[order[1]])
        assert margin > 1e-2, f"greedy step {len(tokens)} is a near tie ({margin})"
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
