#!/usr/bin/env python3
"""Whisper front-end fixtures for host/src/audio (mel_tests.rs, decode_tests.rs).

1. tests/fixtures/whisper/mel_golden.safetensors: the log-mel spectrogram of a
   synthetic 16 kHz signal (`signal()` below; the Rust test builds the same
   one) as the references compute it, frame-major [frames, n_mels], float32:
   - `fw80`, `fw128`: faster-whisper's FeatureExtractor (padding 160, one
     hop), transposed from its [n_mels, frames];
   - `oa80_head`: mlx-whisper's `log_mel_spectrogram(padding=480000)` (the
     openai-whisper recipe), its first 64 frames (51 content frames, then
     frames of the zero padding).
   The script also checks that faster-whisper's mel filters equal
   mlx-whisper's librosa-made ones (assets/mel_filters.npz).
2. tests/fixtures/whisper/tone_*.{wav,flac,mp3}: short tones made with ffmpeg
   (dev machine only; `apt-get install ffmpeg`), for the decoder tests:
   - tone_stereo_8k.wav: 0.4 s, 8 kHz, s16, left 0.6*sin(440 Hz), right 0.2*sin(440 Hz);
   - tone_44k.flac: 0.5 s, 44.1 kHz mono s16, 0.5*sin(440 Hz);
   - tone_24k.mp3: 0.5 s, 24 kHz mono, 48 kbit/s (lame), 0.5*sin(440 Hz).

Usage: .venv-dev/bin/python tests/goldens/whisper_mel.py
"""
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests/fixtures/whisper"

N = 8037  # not a multiple of the hop


def signal(n=N):
    """Two tones (one swelling), a click and a deterministic saw-like 'noise'."""
    t = np.arange(n, dtype=np.float64)
    x = 0.5 * np.sin(2 * np.pi * 440.0 * t / 16000.0)
    x += 0.3 * np.sin(2 * np.pi * 1234.5 * t / 16000.0 + 0.3) * (t / n)
    x += 0.05 * (((t * 7919.0) % 1000.0) / 1000.0 - 0.5)
    x[4000] += 0.9
    return x.astype(np.float32)


def save_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a, dtype=np.float32)
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def mel_golden():
    from faster_whisper.feature_extractor import FeatureExtractor
    import mlx.core as mx
    import mlx_whisper.audio as ma

    mx.set_default_device(mx.cpu)
    x = signal()
    out = {}
    for n_mels in (80, 128):
        fe = FeatureExtractor(feature_size=n_mels)
        ref = np.asarray(ma.mel_filters(n_mels))
        assert np.abs(fe.mel_filters - ref).max() < 1e-6, "faster-whisper and librosa mel filters differ"
        out[f"fw{n_mels}"] = fe(x).T  # [frames, n_mels]
    oa = np.asarray(ma.log_mel_spectrogram(x, n_mels=80, padding=480000))
    out["oa80_head"] = oa[:64]
    print({k: v.shape for k, v in out.items()}, "content frames (fw):", out["fw80"].shape[0] - 1)
    OUT.mkdir(parents=True, exist_ok=True)
    save_safetensors(OUT / "mel_golden.safetensors", out)


def tones():
    ffmpeg = shutil.which("ffmpeg")
    if not ffmpeg:
        print("no ffmpeg: audio fixtures not regenerated", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)

        def run(*args):
            # bitexact, no metadata: a plain 44-byte wav header, reproducible files
            subprocess.run([ffmpeg, "-hide_banner", "-loglevel", "error", "-y", *args[:-1],
                            "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:a", "+bitexact", args[-1]],
                           check=True)

        tone = "sin(2*PI*440*t)"
        run("-f", "lavfi", "-i", f"aevalsrc=0.6*{tone}|0.2*{tone}:s=8000:d=0.4",
            "-c:a", "pcm_s16le", str(OUT / "tone_stereo_8k.wav"))
        run("-f", "lavfi", "-i", f"aevalsrc=0.5*{tone}:s=44100:d=0.5",
            "-c:a", "flac", "-sample_fmt", "s16", str(OUT / "tone_44k.flac"))
        run("-f", "lavfi", "-i", f"aevalsrc=0.5*{tone}:s=24000:d=0.5",
            "-c:a", "libmp3lame", "-b:a", "48k", str(OUT / "tone_24k.mp3"))
    for p in sorted(OUT.glob("tone_*")):
        print(p.name, p.stat().st_size, "bytes")


if __name__ == "__main__":
    mel_golden()
    tones()
