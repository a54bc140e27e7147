#!/usr/bin/env python3
"""Reference transcripts for Whisper converted by `rmlx convert --from-ct2`.

For each model (tiny.en, base: the CTranslate2 directories that
scripts/real-models.sh fetches, converted by rmlx into MLX_DIR):

1. mlx-whisper (`mlx_whisper.load_models.load_model`) loads the converted
   directory; the parameter names and shapes that its `Whisper(dims)` expects
   must all be there with the same shapes (and nothing else), and they are
   recorded in tests/fixtures/real/whisper-<model>-params.json together with
   checks on raw CT2 values read here by an independent numpy reader of
   model.bin (host/tests/real_whisper_convert.rs compares them).
2. Speech made with espeak-ng (resampled by ffmpeg to 16 kHz, stored as FLAC
   under tests/fixtures/whisper/speech-*.flac, so every decoder sees the same
   samples) is transcribed greedily (temperature 0, beam 1, no fallback,
   float32 compute) by faster-whisper on the CT2 model and by mlx-whisper on
   the converted files. Both transcripts, their segments and tokens go to
   tests/fixtures/real/whisper-<model>.json, with whether the texts are equal.
   base also translates a French clip (task "translate").

Usage: whisper_ref.py NAME CT2_DIR MLX_DIR     (NAME: tiny.en or base)
Needs (dev only): faster-whisper, mlx-whisper (pip install --no-deps, plus
tiktoken, more-itertools, scipy, numba), espeak-ng and ffmpeg (apt).
"""
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
AUDIO = ROOT / "tests/fixtures/whisper"
REAL = ROOT / "tests/fixtures/real"

SPEECH = {
    "fox": ("en-us", "The quick brown fox jumps over the lazy dog."),
    "test": ("en-us", "Hello world. This is a test of the speech recognition system, recorded on a Sunday."),
    "fr": ("fr", "Bonjour. Je voudrais un café et un croissant, s'il vous plaît."),
}


def read_ct2(path):
    """An independent reader of model.bin (version 6): {name: (dtype_id, shape, bytes)}, aliases."""
    b = Path(path).read_bytes()
    pos = 0

    def take(n):
        nonlocal pos
        s = b[pos:pos + n]
        pos += n
        return s

    def u(fmt):
        return struct.unpack("<" + fmt, take(struct.calcsize("<" + fmt)))[0]

    def s():
        return take(u("H"))[:-1].decode()

    assert u("I") == 6
    assert s() == "WhisperSpec"
    u("I")
    out = {}
    for _ in range(u("I")):
        name = s()
        shape = [u("I") for _ in range(u("B"))]
        dt = u("B")
        out[name] = (dt, shape, take(u("I")))
    aliases = {s(): s() for _ in range(u("I"))}
    return out, aliases


def speech_file(key):
    """tests/fixtures/whisper/speech-<key>.flac (made once with espeak-ng + ffmpeg)."""
    path = AUDIO / f"speech-{key}.flac"
    if not path.exists():
        voice, text = SPEECH[key]
        assert shutil.which("espeak-ng") and shutil.which("ffmpeg"), "needs espeak-ng and ffmpeg"
        with tempfile.TemporaryDirectory() as d:
            wav = Path(d) / "a.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(wav), text], check=True)
            subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(wav), "-ar", "16000",
                            "-ac", "1", "-sample_fmt", "s16", "-c:a", "flac", "-map_metadata", "-1",
                            "-fflags", "+bitexact", "-flags:a", "+bitexact", str(path)], check=True)
    return path


def check_params(name, ct2_dir, mlx_dir):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_whisper import whisper
    from mlx_whisper.load_models import load_model

    cfg = json.loads((Path(mlx_dir) / "config.json").read_text())
    cfg.pop("model_type")
    dims = whisper.ModelDimensions(**cfg)
    expected = {k: list(v.shape) for k, v in tree_flatten(whisper.Whisper(dims).parameters())}
    # alignment_heads is data: [pairs, 2], the pairs of the CT2 config
    heads = json.loads((Path(ct2_dir) / "config.json").read_text())["alignment_heads"]
    expected["alignment_heads"] = [len(heads), 2]
    got = {k: list(v.shape) for k, v in mx.load(str(Path(mlx_dir) / "weights.safetensors")).items()}
    assert expected == got, (set(expected) ^ set(got), [k for k in expected if got.get(k) != expected[k]])
    model = load_model(str(mlx_dir))
    loaded = dict(tree_flatten(model.parameters()))
    assert set(loaded) == set(expected)
    assert np.asarray(model.alignment_heads).tolist() == heads

    ct2, aliases = read_ct2(Path(ct2_dir) / "model.bin")
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}, aliases
    f16 = lambda v: np.frombuffer(v[2], dtype=np.float16).reshape(v[1])  # noqa: E731
    emb = ct2["decoder/embeddings/weight"]
    qkv = f16(ct2["encoder/layer_0/self_attention/linear_0/weight"])
    d = qkv.shape[1]
    conv1 = f16(ct2["encoder/conv1/weight"])  # [out, in, k]
    checks = {
        # the embedding is copied bit for bit (float16 -> float16)
        "decoder.token_embedding.weight": {"sha256_f16": hashlib.sha256(emb[2]).hexdigest()},
        # rows d..2d of the fused q,k,v are the key
        "encoder.blocks.0.attn.key.weight": {"row0_first8": qkv[d, :8].astype(float).tolist(),
                                             "sum_f64": float(qkv[d:2 * d].astype(np.float64).sum())},
        # conv weights are [out, k, in] in MLX: element [0, 2, 5] is CT2's [0, 5, 2]
        "encoder.conv1.weight": {"at_0_2_5": float(conv1[0, 5, 2]), "at_7_0_79": float(conv1[7, 79, 0])},
    }
    out = {"model": f"whisper-{name}", "dims": cfg, "params": expected, "checks": checks}
    (REAL / f"whisper-{name}-params.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"{name}: {len(expected)} parameters as mlx-whisper expects")


def transcribe(name, ct2_dir, mlx_dir):
    import mlx.core as mx
    import importlib
    from faster_whisper import WhisperModel
    from faster_whisper.audio import decode_audio
    from mlx.utils import tree_map
    from mlx_whisper.load_models import load_model

    mt = importlib.import_module("mlx_whisper.transcribe")  # the package's `transcribe` is the function
    mx.set_default_device(mx.cpu)
    fw = WhisperModel(str(ct2_dir), device="cpu", compute_type="float32")
    model = load_model(str(mlx_dir), dtype=mx.float32)
    model.update(tree_map(lambda x: x.astype(mx.float32), model.parameters()))
    mt.ModelHolder.model, mt.ModelHolder.model_path = model, str(mlx_dir)
    jobs = [("fox", "transcribe"), ("test", "transcribe")]
    if not name.endswith(".en"):
        jobs.append(("fr", "translate"))
    results = []
    for key, task in jobs:
        path = speech_file(key)
        audio = decode_audio(str(path))  # 16 kHz float32, the same samples for both
        lang = "fr" if key == "fr" else "en"
        segs, _ = fw.transcribe(audio, beam_size=1, best_of=1, temperature=0.0, language=lang, task=task,
                                vad_filter=False, condition_on_previous_text=True)
        f = [{"start": s.start, "end": s.end, "text": s.text, "tokens": s.tokens} for s in segs]
        r = mt.transcribe(audio, path_or_hf_repo=str(mlx_dir), temperature=0.0, fp16=False,
                          language=lang if not name.endswith(".en") else None, task=task,
                          condition_on_previous_text=True)
        m = [{"start": s["start"], "end": s["end"], "text": s["text"], "tokens": s["tokens"]} for s in r["segments"]]
        ft, mt_text = "".join(s["text"] for s in f).strip(), r["text"].strip()
        results.append({
            "audio": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "samples": int(len(audio)),
            "spoken": SPEECH[key][1], "language": lang, "task": task,
            "faster_whisper": {"text": ft, "segments": f},
            "mlx_whisper": {"text": mt_text, "segments": m},
            "same_text": ft == mt_text,
        })
        print(f"{name} {key} {task}: faster-whisper {ft!r}\n{' ' * len(name)}   mlx-whisper    {mt_text!r}  same={ft == mt_text}")
    out = {"model": f"whisper-{name}", "decoding": "greedy: temperature 0 (no fallback), beam 1, float32 on CPU, "
           "condition_on_previous_text, timestamps on, no VAD",
           "references": {"faster_whisper": __import__("faster_whisper").__version__,
                          "ctranslate2": __import__("ctranslate2").__version__,
                          "mlx_whisper": __import__("mlx_whisper").__version__},
           "results": results}
    (REAL / f"whisper-{name}.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    name, ct2_dir, mlx_dir = sys.argv[1:4]
    REAL.mkdir(parents=True, exist_ok=True)
    check_params(name, ct2_dir, mlx_dir)
    transcribe(name, ct2_dir, mlx_dir)
