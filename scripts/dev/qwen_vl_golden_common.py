"""What the Qwen-VL golden scripts (qwen2_5_vl_golden.py, qwen3_vl_golden.py)
share: the tiny word-level tokenizer with Qwen's special tokens and a
Qwen-style chat template, the random weights of a tiny mlx-vlm model, and a
chat prompt with images through mlx-vlm's own processor and
`stream_generate`. Run the scripts from the repo root with the dev venv.
"""
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from vision_golden_common import write_json

IMAGES = Path("tests/fixtures/images")

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


def tokenizer_json():
    """A word-level tokenizer over 300 ids: SPECIAL, WORDS from 4, `w<i>` for the rest."""
    vocab = {s: i for i, s in SPECIAL}
    vocab.update({w: 4 + i for i, w in enumerate(WORDS)})
    ids = dict(SPECIAL)
    vocab.update({f"w{i}": i for i in range(4 + len(WORDS), 300) if i not in ids})
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in SPECIAL]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}


def write_tokenizer(model: Path):
    """tokenizer.json and tokenizer_config.json (TEMPLATE, EOS `<|im_end|>`)."""
    write_json(model / "tokenizer.json", tokenizer_json())
    write_json(model / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
        "chat_template": TEMPLATE,
    })


def random_weights(model) -> dict:
    """Each parameter of the mlx-vlm `model` drawn from mx.random (seed it
    first), in float32: norms near 1, small embeddings and biases, the rest
    its initial value plus noise (conv kernels and position tables noise)."""
    weights = {}
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight") \
                or name.endswith("ln_q.weight") or "layernorm" in name:
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


def chat_inputs(proc, parts):
    """A user turn of `parts` (text, or an image file of IMAGES) through the
    chat template and mlx-vlm's processor: the prompt, the image paths, the
    processor's inputs, the expanded ids and each image's grid (t, h, w)."""
    from mlx_vlm.utils import prepare_inputs

    content = [{"type": "image"} if p.endswith(".png") else {"type": "text", "text": p} for p in parts]
    images = [str(IMAGES / p) for p in parts if p.endswith(".png")]
    prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
    inputs = prepare_inputs(proc, images=images, prompts=prompt)
    ids = [int(t) for t in np.array(inputs["input_ids"][0])]
    grid = [[int(v) for v in g] for g in np.array(inputs["image_grid_thw"])]
    return prompt, images, inputs, ids, grid


def greedy_top5(model, proc, prompt, images, steps):
    """`stream_generate`'s first `steps` greedy tokens and each step's top-5
    [id, logprob]; refuses a near tie."""
    from mlx_vlm import stream_generate

    tokens, top5 = [], []
    for r in stream_generate(model, proc, prompt, image=images, max_tokens=steps, temperature=0.0):
        if len(tokens) == steps:
            break
        lp = np.array(r.logprobs, dtype=np.float32).reshape(-1)
        order = np.argsort(-lp, kind="stable")[:5]
        tokens.append(int(r.token))
        top5.append([[int(t), float(lp[t])] for t in order])
        margin = float(lp[order[0]] - lp[order[1]])
        assert margin > 1e-2, f"greedy step {len(tokens)} is a near tie ({margin})"
    return tokens, top5
