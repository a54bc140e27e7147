"""Gemma 4 with `use_bidirectional_attention: "vision"` (issue 15): what
mlx-vlm 0.7.10 computes when each image's soft tokens attend to every soft
token of their own image (both ways) on top of the causal (windowed on
sliding layers) mask, for the tiny random Gemma 4 vision fixture with only
that key added to its text_config.

Run from the repo root with the dev venv (after scripts/dev/gemma4_vision_golden.py
and gemma4_serve_golden.py made the model, tokenizer and images):
    .venv-dev/bin/python tests/goldens/gemma4_bidir_golden.py

The model directory is a temporary copy of tests/fixtures/models/gemma4-vision-tiny
with `text_config.use_bidirectional_attention = "vision"` (the tests make the
same copy; no second model is committed). Writes
tests/fixtures/goldens/gemma4-vision-bidir/: golden.json (per case the prompt
ids, soft-token counts, mlx-vlm `stream_generate`'s greedy tokens and the
top-5 (id, logprob) of every step; `logits_from`: the first position after
the last image) and <case>.logits.f32: the full-prompt forward's float32
logits [L - logits_from, vocab] from `logits_from` on (mlx-vlm's model called
with the processor's `mm_token_type_ids`).
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts/dev"))
from vision_golden_common import versions, write_json  # noqa: E402

SRC = Path("tests/fixtures/models/gemma4-vision-tiny")
GOLD = Path("tests/fixtures/goldens/gemma4-vision-bidir")
IMAGES = Path("tests/fixtures/images")
STEPS = 6
CASES = {
    "one_image": ["what is in this picture", "grey50x61.png"],
    "two_images": ["describe", "rgb37x23.png", "and", "thin61x5.png", "please"],
}


def bidir_copy(dst: Path):
    shutil.copytree(SRC, dst, dirs_exist_ok=True)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["text_config"]["use_bidirectional_attention"] = "vision"
    write_json(dst / "config.json", cfg)


def case(model, proc, name, parts):
    from mlx_vlm import stream_generate
    from mlx_vlm.utils import prepare_inputs

    content = [{"type": "image"} if p.endswith(".png") else {"type": "text", "text": p} for p in parts]
    images = [str(IMAGES / p) for p in parts if p.endswith(".png")]
    prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
    inputs = prepare_inputs(proc, images=images, prompts=prompt)
    ids = inputs["input_ids"]
    tt = inputs.get("mm_token_type_ids")
    assert tt is not None, "the processor gave no mm_token_type_ids"
    tt = mx.array(np.asarray(tt))
    kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask", "mm_token_type_ids")}
    full = model(ids, pixel_values=inputs["pixel_values"], mm_token_type_ids=tt, **kw).logits[0].astype(mx.float32)
    causal = model(ids, pixel_values=inputs["pixel_values"], **kw).logits[0].astype(mx.float32)
    id_list = [int(t) for t in np.array(ids[0])]
    last_img = max(i for i, t in enumerate(id_list) if t == model.config.image_token_id)
    first_img = id_list.index(model.config.image_token_id)
    after = last_img + 1
    lf, lc = np.array(full), np.array(causal)
    # The overlay changes the image rows and everything after; nothing before.
    assert np.abs(lf[:first_img] - lc[:first_img]).max() == 0.0
    d = float(np.abs(lf[after:] - lc[after:]).max())
    assert d > 1e-2, f"{name}: the bidirectional overlay barely moves the logits after the image ({d})"

    tokens, top5 = [], []
    for r in stream_generate(model, proc, prompt, image=images, max_tokens=STEPS, temperature=0.0):
        if len(tokens) == STEPS:
            break
        lp = np.array(r.logprobs, dtype=np.float32).reshape(-1)
        order = np.argsort(-lp, kind="stable")[:5]
        tokens.append(int(r.token))
        top5.append([[int(t), float(lp[t])] for t in order])
    # stream_generate's first step is the full forward's last row.
    last = lf[-1] - np.log(np.exp(lf[-1] - lf[-1].max()).sum()) - lf[-1].max()
    assert abs(top5[0][0][1] - float(last[top5[0][0][0]])) < 1e-4, "stream_generate did not use the overlay"
    _, counts = proc.image_processor([__import__("PIL.Image").Image.open(p) for p in images])
    GOLD.mkdir(parents=True, exist_ok=True)
    lf[after:].astype("<f4").tofile(GOLD / f"{name}.logits.f32")
    print(name, len(id_list), [int(c) for c in counts], tokens, "max |bidir - causal| after the image", d)
    return {"parts": parts, "prompt": prompt, "prompt_ids": id_list, "soft_tokens": [int(c) for c in counts],
            "logits_from": after, "tokens": tokens, "top5": top5, "max_diff_vs_causal": d}


def main():
    from mlx_vlm import load

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "gemma4-vision-bidir"
        bidir_copy(model_dir)
        model, proc = load(str(model_dir))
        assert model.config.text_config.use_bidirectional_attention == "vision"
        cases = {name: case(model, proc, name, parts) for name, parts in CASES.items()}
    write_json(GOLD / "golden.json", {"steps": STEPS, "vocab": 300, "cases": cases, **versions()})


if __name__ == "__main__":
    main()
