"""What the tiny vision golden scripts (gemma3_vision_golden.py,
gemma4_vision_golden.py, gemma4_serve_golden.py) share: writing a model
directory mlx-vlm loads, little-endian f32 arrays and golden.json with the
versions that made them. Run the scripts from the repo root with the dev venv.
"""
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np


def save_model(model: Path, weights: dict, config: dict, extra: dict | None = None):
    """model.safetensors (mlx metadata), config.json and `extra` JSON files."""
    model.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(model / "model.safetensors"), weights, metadata={"format": "mlx"})
    write_json(model / "config.json", config)
    for name, value in (extra or {}).items():
        write_json(model / name, value)


def write_json(path: Path, value):
    Path(path).write_text(json.dumps(value, indent=1) + "\n")


def versions() -> dict:
    import mlx_vlm

    return {"mlx": mx.__version__, "mlx_vlm": getattr(mlx_vlm, "__version__", "?")}


def write_golden(gold: Path, arrays: dict, meta: dict, model: Path | None = None):
    """<name>.f32 per array, golden.json (meta + versions); prints both and
    the model directory's file sizes."""
    gold.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        np.asarray(arr, "<f4").tofile(gold / f"{name}.f32")
    meta = {**meta, **versions()}
    write_json(gold / "golden.json", meta)
    print(json.dumps(meta))
    if model is not None:
        print("sizes:", {f: os.path.getsize(model / f) for f in sorted(os.listdir(model))})
    return meta
