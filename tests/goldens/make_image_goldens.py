"""Image front-end goldens (host/src/media): tiny synthetic PNGs and what the
Hugging Face image processors (transformers' PIL backends) make of them.

Run from the repo root with the dev venv (needs transformers and pillow):
    .venv-dev/bin/python tests/goldens/make_image_goldens.py
Writes tests/fixtures/images/: the PNGs (and one JPEG), one <image>.<config>.json (shape,
grid_thw) and <image>.<config>.f32 (little-endian f32 pixel_values) per pair,
and configs/<config>.json (the preprocessor_config.json used).
"""
import json
import os

import numpy as np
from PIL import Image
import transformers
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

OUT = "tests/fixtures/images"

CONFIGS = {
    "siglip": (SiglipImageProcessorPil, {
        "image_processor_type": "SiglipImageProcessor", "do_resize": True,
        "size": {"height": 24, "width": 24}, "resample": 3, "do_rescale": True,
        "rescale_factor": 0.00392156862745098, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}),
    "gemma3": (Gemma3ImageProcessorPil, {
        "image_processor_type": "Gemma3ImageProcessor", "do_resize": True,
        "size": {"height": 20, "width": 20}, "resample": 2, "do_rescale": True,
        "rescale_factor": 0.00392156862745098, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
        "do_pan_and_scan": False}),
    "qwen2vl": (Qwen2VLImageProcessorPil, {
        "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "resample": 3,
        "do_rescale": True, "rescale_factor": 0.00392156862745098, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
        "min_pixels": 14 * 14 * 2, "max_pixels": 14 * 14 * 8,
        "patch_size": 7, "temporal_patch_size": 2, "merge_size": 2}),
}


def images():
    rng = np.random.default_rng(15)
    y, x = np.mgrid[0:23, 0:37]
    grad = np.stack([x * 255 // 36, y * 255 // 22, (x + y) * 4 % 256], -1).astype(np.uint8)
    noise = rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)
    rgb = np.where((x // 5 + y // 5)[..., None] % 2 == 0, grad, noise).astype(np.uint8)
    yield "rgb37x23", Image.fromarray(rgb, "RGB")
    rgba = rng.integers(0, 256, (9, 13, 4), dtype=np.uint8)
    yield "rgba13x9", Image.fromarray(rgba, "RGBA")
    gy, gx = np.mgrid[0:61, 0:50]
    grey = ((gx * 7 + gy * 3) % 256).astype(np.uint8)
    yield "grey50x61", Image.fromarray(grey, "L")
    yield "rgbjpeg37x23", Image.fromarray(rgb, "RGB")


def main():
    os.makedirs(f"{OUT}/configs", exist_ok=True)
    for name, (_, cfg) in CONFIGS.items():
        with open(f"{OUT}/configs/{name}.json", "w") as f:
            json.dump(cfg, f, indent=1)
    for iname, img in images():
        # One JPEG (4:2:0, quality 85): decoders differ by a few u8 steps.
        ext = "jpg" if iname == "rgbjpeg37x23" else "png"
        path = f"{OUT}/{iname}.{ext}"
        img.save(path, **({"quality": 85} if ext == "jpg" else {}))
        loaded = Image.open(path)  # what rmlx decodes: the PNG on disk
        for cname, (cls, cfg) in CONFIGS.items():
            kwargs = {k: v for k, v in cfg.items() if k != "image_processor_type"}
            proc = cls(**kwargs)
            out = proc(loaded, return_tensors="np")
            pv = np.asarray(out["pixel_values"], dtype=np.float32)
            if cname != "qwen2vl":
                pv = pv[0]  # [1, 3, H, W] -> [3, H, W]
            meta = {"shape": list(pv.shape), "transformers": transformers.__version__}
            if "image_grid_thw" in out:
                meta["grid_thw"] = [int(v) for v in np.asarray(out["image_grid_thw"])[0]]
            with open(f"{OUT}/{iname}.{cname}.json", "w") as f:
                json.dump(meta, f)
            pv.astype("<f4").tofile(f"{OUT}/{iname}.{cname}.f32")
            print(iname, cname, meta)


if __name__ == "__main__":
    main()
