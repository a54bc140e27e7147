"""Gemma 4 images end to end (issue 15): what mlx-vlm 0.7.10's own processor
and `generate` make of images and chat prompts for the tiny random Gemma 4
vision fixture, so the host's preprocessing and the server can be compared.

Run from the repo root with the dev venv (after gemma4_vision_golden.py made
the model; this script leaves config.json and model.safetensors alone):
    .venv-dev/bin/python scripts/dev/gemma4_serve_golden.py

Writes
- tests/fixtures/models/gemma4-vision-tiny/: tokenizer.json (word level over
  the 300 ids, Gemma 4's image tokens `<|image>` 288, `<image|>` 289,
  `<|image|>` 290 as special added tokens), tokenizer_config.json (those as
  `extra_special_tokens`, a Gemma-4-style chat template whose image part
  renders `<|image|>`), processor_config.json (Gemma4ImageProcessor nested
  under `image_processor`, as Hugging Face's Gemma 4 repos ship it: patch 4,
  pooling 2, max_soft_tokens 6, bicubic, rescale 1/255, no normalisation);
- tests/fixtures/images/: thin61x5.png, rgb24x16.png, rgb11x7.png (new RGB
  PNGs: the 1-row fallback, no resize, upscaling) and, per image,
  <image>.gemma4.f32 / .json: mlx-vlm's Gemma4ImageProcessor pixel values
  [3, H, W] and its soft-token count; configs/gemma4.json (the processor);
- tests/fixtures/goldens/gemma4-vision-serve/golden.json: per chat case the
  rendered prompt, the ids mlx-vlm's Gemma4Processor expands it to, each
  image's soft-token count, and mlx-vlm `stream_generate`'s greedy tokens
  with the top-5 (id, logprob) of every step.

The tiny random model repeats its last prompt token ("model", id 5) under
greedy decoding whatever the image; the per-step top-5 log-probabilities are
what the image moves (the runner-up ids and values differ per image).
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from vision_golden_common import versions, write_json  # noqa: E402

MODEL = Path("tests/fixtures/models/gemma4-vision-tiny")
GOLD = Path("tests/fixtures/goldens/gemma4-vision-serve")
IMAGES = Path("tests/fixtures/images")
STEPS = 6

SPECIAL = [(0, "<pad>"), (1, "<eos>"), (2, "<bos>"), (3, "<unk>"), (288, "<|image>"), (289, "<image|>"),
           (290, "<|image|>"), (291, "<|audio|>"), (292, "<|turn>"), (293, "<turn|>")]
WORDS = ["user", "model", "what", "is", "in", "this", "picture", "describe", "it", "please", "and", "the", "colour"]

# Gemma 4's template shape: <|turn>role\n ... <turn|>\n, an image part as <|image|>.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{% if m.content is string %}{{ m.content | trim }}{% else %}{% for p in m.content %}"
    "{% if p.type == 'image' %}<|image|>{% elif p.type == 'text' %}{{ p.text | trim }}{% endif %}"
    "{% endfor %}{% endif %}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)

IMAGE_PROCESSOR = {
    "image_processor_type": "Gemma4ImageProcessor",
    "do_resize": True,
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": False,
    "do_convert_rgb": True,
    "patch_size": 4,
    "max_soft_tokens": 6,
    "pooling_kernel_size": 2,
}

# One user turn per case: text parts and image files, in order.
CASES = {
    "one_image": ["what is in this picture", "rgb37x23.png"],
    "other_image": ["what is in this picture", "grey50x61.png"],
    "two_images": ["describe", "rgb37x23.png", "and", "thin61x5.png", "please"],
}
PIXEL_IMAGES = ["rgb37x23.png", "grey50x61.png", "thin61x5.png", "rgb24x16.png", "rgb11x7.png"]


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


def write_model_files():
    write_json(MODEL / "tokenizer.json", tokenizer_json())
    write_json(MODEL / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "extra_special_tokens": {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                                 "audio_token": "<|audio|>"},
        "chat_template": TEMPLATE,
    })
    write_json(MODEL / "processor_config.json", {
        "processor_class": "Gemma4Processor",
        "image_seq_length": IMAGE_PROCESSOR["max_soft_tokens"],
        "image_processor": IMAGE_PROCESSOR,
    })


def write_images():
    rng = np.random.default_rng(1505)
    thin = rng.integers(0, 256, (5, 61, 3), dtype=np.uint8)
    Image.fromarray(thin, "RGB").save(IMAGES / "thin61x5.png")
    y, x = np.mgrid[0:16, 0:24]
    exact = np.stack([x * 10, y * 15, (x * y) % 256], -1).astype(np.uint8)
    Image.fromarray(exact, "RGB").save(IMAGES / "rgb24x16.png")
    small = rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)
    Image.fromarray(small, "RGB").save(IMAGES / "rgb11x7.png")


def pixel_goldens(proc):
    write_json(IMAGES / "configs/gemma4.json", IMAGE_PROCESSOR)
    for name in PIXEL_IMAGES:
        data, tokens = proc.image_processor([Image.open(IMAGES / name)])
        pv = np.asarray(data["pixel_values"], dtype=np.float32)[0]  # [3, H, W]
        stem = name.rsplit(".", 1)[0]
        meta = {"shape": list(pv.shape), "soft_tokens": int(tokens[0]), **versions()}
        write_json(IMAGES / f"{stem}.gemma4.json", meta)
        pv.astype("<f4").tofile(IMAGES / f"{stem}.gemma4.f32")
        print(name, meta)


def chat_case(model, proc, parts):
    from mlx_vlm import stream_generate
    from mlx_vlm.utils import prepare_inputs

    content = [{"type": "image"} if p.endswith(".png") else {"type": "text", "text": p} for p in parts]
    images = [str(IMAGES / p) for p in parts if p.endswith(".png")]
    prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
    inputs = prepare_inputs(proc, images=images, prompts=prompt)
    ids = [int(t) for t in np.array(inputs["input_ids"][0])]
    _, counts = proc.image_processor([Image.open(p) for p in images])
    tokens, top5 = [], []
    for r in stream_generate(model, proc, prompt, image=images, max_tokens=STEPS, temperature=0.0):
        if len(tokens) == STEPS:
            break  # the last response repeats the last token with the finish reason
        lp = np.array(r.logprobs, dtype=np.float32).reshape(-1)
        order = np.argsort(-lp, kind="stable")[:5]
        tokens.append(int(r.token))
        top5.append([[int(t), float(lp[t])] for t in order])
        margin = float(lp[order[0]] - lp[order[1]])
        assert margin > 1e-2, f"greedy step {len(tokens)} is a near tie ({margin})"
    return {"parts": parts, "prompt": prompt, "prompt_ids": ids, "soft_tokens": [int(c) for c in counts],
            "tokens": tokens, "top5": top5}


def main():
    from mlx_vlm import load

    write_model_files()
    write_images()
    model, proc = load(str(MODEL))
    assert (proc.image_token, proc.boi_token, proc.eoi_token) == ("<|image|>", "<|image>", "<image|>")
    pixel_goldens(proc)
    cases = {name: chat_case(model, proc, parts) for name, parts in CASES.items()}
    for name, c in cases.items():
        print(name, len(c["prompt_ids"]), c["soft_tokens"], c["tokens"], c["top5"][0][:3])
    GOLD.mkdir(parents=True, exist_ok=True)
    write_json(GOLD / "golden.json", {"steps": STEPS, "cases": cases, **versions()})


if __name__ == "__main__":
    main()
