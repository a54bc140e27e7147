"""Golden of Qwen3-VL's vision tower (plugins/arch-qwen3/src/qwen3_vl_vision.rs).

Builds a tiny random tower with mlx-vlm's own classes (mlx_vlm 0.7.10,
models/qwen3_vl/vision.py): depth 4, hidden 24, 2 heads (head_dim 12), patch 2,
temporal patch 2, merge 2, a 6 x 6 table of learned position embeddings
(num_position_embeddings 36), deepstack mergers on blocks 0 and 2.

One call on three grids, as mlx-vlm batches a prompt's media:
  (1, 8, 12)  a non-square image, position table upsampled (6 -> 8, 6 -> 12)
  (1, 4, 6)   a non-square image, rows downsampled (6 -> 4), columns kept
  (2, 4, 4)   two frames (a video's grid): attention per frame, embeddings tiled
The two images' pixels [3, H, W] are patchified as the Qwen2-VL / Qwen3-VL
image processor does (the frame repeated temporal_patch_size times, patches
ordered (t, h/m, w/m, m, m), each flattened (C, T, P, P)); the video grid's
patches are random.

Writes tests/fixtures/goldens/qwen3_vl-vision-tiny/:
  golden.json    config, grids, pixel shapes, weight index (name -> shape, offset in floats)
  weights.f32    every tensor (HF layout: patch_embed.proj.weight [O, C, T, P, P]), little-endian float32
  pixels.f32     the two images' pixels, concatenated, each [3, H, W]
  patches.f32    all patches [N_patches, C*T*P*P], grids in order
  features.f32   the tower's merged output [sum(t*h*w/4), out_hidden]
  deepstack.f32  the deepstack mergers' outputs, [len(indexes), sum(t*h*w/4), out_hidden]

Run: .venv-dev/bin/python tests/goldens/qwen3_vl_vision_golden.py
"""
import json
import os

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_vlm.models.qwen3_vl.config import VisionConfig
from mlx_vlm.models.qwen3_vl.vision import VisionModel

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "goldens", "qwen3_vl-vision-tiny")

CFG = dict(
    model_type="qwen3_vl",
    depth=4,
    hidden_size=24,
    intermediate_size=40,
    out_hidden_size=16,
    num_heads=2,
    patch_size=2,
    spatial_merge_size=2,
    temporal_patch_size=2,
    in_channels=3,
    num_position_embeddings=36,
    deepstack_visual_indexes=[0, 2],
)
GRIDS = [(1, 8, 12), (1, 4, 6), (2, 4, 4)]


def patchify(img, c):
    """img [C, H, W] -> patches [t*h*w, C*T*P*P], the Qwen2-VL image processor's layout."""
    T, P, m = c["temporal_patch_size"], c["patch_size"], c["spatial_merge_size"]
    C, H, W = img.shape
    frames = np.repeat(img[None], T, axis=0)  # [T, C, H, W]
    gt, gh, gw = 1, H // P, W // P
    p = frames.reshape(gt, T, C, gh // m, m, P, gw // m, m, P).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return p.reshape(gt * gh * gw, C * T * P * P)


def main():
    os.makedirs(OUT, exist_ok=True)
    mx.random.seed(11)
    np.random.seed(11)
    cfg = VisionConfig(**CFG)
    model = VisionModel(cfg)
    # Random weights, norms and biases included, scaled so activations stay O(1).
    params = {}
    for k, v in tree_flatten(model.parameters()):
        if "norm" in k and k.endswith(".weight"):
            params[k] = mx.array(1.0 + 0.1 * np.random.randn(*v.shape).astype(np.float32))
        elif "norm" in k and k.endswith(".bias"):
            params[k] = mx.array(0.1 * np.random.randn(*v.shape).astype(np.float32))
        else:
            params[k] = mx.array((0.3 * np.random.randn(*v.shape)).astype(np.float32))
    model.load_weights(list(params.items()))

    K = CFG["in_channels"] * CFG["temporal_patch_size"] * CFG["patch_size"] ** 2
    imgs, patches = [], []
    for t, gh, gw in GRIDS:
        if t == 1:
            img = np.random.randn(3, gh * CFG["patch_size"], gw * CFG["patch_size"]).astype(np.float32)
            imgs.append(img)
            patches.append(patchify(img, CFG))
        else:
            patches.append(np.random.randn(t * gh * gw, K).astype(np.float32))
    x = np.concatenate(patches, 0)
    out, deep = model(mx.array(x), mx.array(GRIDS))
    mx.eval(out, deep)

    index, blob, off = {}, [], 0
    for k, v in tree_flatten(model.parameters()):
        a = np.array(v, dtype=np.float32)
        if k == "patch_embed.proj.weight":  # mlx [O, T, P, P, C] -> HF [O, C, T, P, P]
            a = a.transpose(0, 4, 1, 2, 3)
        index["vision_tower." + k] = {"shape": list(a.shape), "offset": off}
        blob.append(a.ravel())
        off += a.size
    np.concatenate(blob).astype("<f4").tofile(os.path.join(OUT, "weights.f32"))
    np.concatenate([i.ravel() for i in imgs]).astype("<f4").tofile(os.path.join(OUT, "pixels.f32"))
    x.astype("<f4").tofile(os.path.join(OUT, "patches.f32"))
    feats = np.array(out, dtype=np.float32)
    feats.astype("<f4").tofile(os.path.join(OUT, "features.f32"))
    deeps = np.stack([np.array(d, dtype=np.float32) for d in deep])
    deeps.astype("<f4").tofile(os.path.join(OUT, "deepstack.f32"))
    meta = dict(
        vision_config=CFG,
        grids=GRIDS,
        pixel_shapes=[list(i.shape) for i in imgs],
        patches_shape=list(x.shape),
        features_shape=list(feats.shape),
        deepstack_shape=list(deeps.shape),
        weights=index,
    )
    with open(os.path.join(OUT, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print("features", feats.shape, "deepstack", deeps.shape, "weights", off, "floats")


if __name__ == "__main__":
    main()
