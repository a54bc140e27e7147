"""Whisper architecture golden (dev script; needs mlx-whisper in .venv-dev):

    .venv-dev/bin/python tests/goldens/whisper_arch.py

Builds mlx-whisper's `Whisper(dims, dtype=float32)` with a tiny random config
(80 mels, 16 audio positions, state 64, 4 heads, 2 + 2 layers, 300 tokens,
32 text positions), every parameter random (seeded), and writes
- tests/fixtures/models/whisper-tiny-f32/: config.json (model_type whisper +
  ModelDimensions) and weights.safetensors (mlx-whisper's names, as
  `rmlx convert --from-ct2` writes them; alignment_heads included);
- tests/fixtures/whisper/arch_golden.safetensors:
  - `mel` [1, 32, 80] random frames and `encoder` [1, 16, 64] the encoder output;
  - `prompt` int32 [5] and `prompt_logits` [1, 5, 300]: the decoder over the
    prompt in one forward (no cache);
  - `steps` int32 [3] and `step_logits` [3, 300]: three more tokens, one
    forward each over mlx-whisper's kv_cache (self-attention K/V appended,
    cross-attention K/V reused), as its greedy decoder runs.

    .venv-dev/bin/python tests/goldens/whisper_arch.py long DIR

DIR is tiny.en converted by `rmlx convert --from-ct2` (scripts/real-models.sh
whisper-tiny.en). Transcribes 40.3 s of audio made of the fixture clips
(speech-test, 2 s of silence, speech-fox, 2 s of silence, six clips in all, as
16 kHz samples int16 / 32768) with mlx-whisper's `transcribe` (temperature 0
only, float32, its other defaults: timestamps, condition_on_previous_text) and
writes tests/fixtures/real/whisper-tiny.en-long.json: the text and each
segment's seek, start, end, text and tokens (two 30 s windows: the second
starts where the first one's last timestamp says).
"""
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_whisper.whisper import ModelDimensions, Whisper

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests/fixtures/models/whisper-tiny-f32"
GOLDEN = ROOT / "tests/fixtures/whisper/arch_golden.safetensors"

import sys

if len(sys.argv) > 1 and sys.argv[1] == "long":
    import mlx_whisper
    from mlx_whisper.audio import load_audio

    clips = [load_audio(str(ROOT / f"tests/fixtures/whisper/{n}")) for n in ["speech-test.flac", "speech-fox.flac"]]
    silence = np.zeros(2 * 16000, np.float32)
    audio = np.concatenate([x for i in range(6) for x in (clips[i % 2], silence)])
    r = mlx_whisper.transcribe(audio, path_or_hf_repo=sys.argv[2], temperature=0.0, fp16=False)
    out = {
        "audio": "speech-test, 2 s silence, speech-fox, 2 s silence, x3 (16 kHz)",
        "samples": int(len(audio)),
        "decoding": "mlx_whisper.transcribe(temperature=0.0, fp16=False), other defaults",
        "text": r["text"],
        "segments": [{k: s[k] for k in ("seek", "start", "end", "text", "tokens")} for s in r["segments"]],
    }
    dst = ROOT / "tests/fixtures/real/whisper-tiny.en-long.json"
    dst.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dst}: {len(out['segments'])} segments")
    sys.exit(0)

dims = ModelDimensions(
    n_mels=80, n_audio_ctx=16, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
    n_vocab=300, n_text_ctx=32, n_text_state=64, n_text_head=4, n_text_layer=2,
)

mx.random.seed(7)
rng = np.random.default_rng(7)
model = Whisper(dims, dtype=mx.float32)
params = dict(tree_flatten(model.parameters()))
new = {}
for name, p in params.items():
    if name == "alignment_heads":
        new[name] = p
        continue
    shape = p.shape
    if name.endswith("ln.weight") or name.endswith("_ln.weight") or name.endswith("ln_post.weight"):
        v = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name.endswith(".bias") or "positional_embedding" in name:
        v = 0.1 * rng.standard_normal(shape)
    elif "token_embedding" in name:
        v = 0.5 * rng.standard_normal(shape)
    else:
        fan_in = int(np.prod(shape[1:]))
        v = rng.standard_normal(shape) / np.sqrt(fan_in)
    new[name] = mx.array(v.astype(np.float32))
model.load_weights(list(new.items()))
mx.eval(model.parameters())

MODEL.mkdir(parents=True, exist_ok=True)
cfg = {"model_type": "whisper", **dims.__dict__}
(MODEL / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
mx.save_safetensors(str(MODEL / "weights.safetensors"), dict(tree_flatten(model.parameters())))

mel = mx.array(rng.standard_normal((1, 2 * dims.n_audio_ctx, dims.n_mels)).astype(np.float32))
enc = model.encoder(mel)
prompt = mx.array([[3, 17, 250, 42, 99]], dtype=mx.int32)
logits, kv_cache, _ = model.decoder(prompt, enc)
steps = [7, 123, 299]
step_logits = []
for t in steps:
    out, kv_cache, _ = model.decoder(mx.array([[t]], dtype=mx.int32), enc, kv_cache=kv_cache)
    step_logits.append(out[0, -1])
mx.save_safetensors(str(GOLDEN), {
    "mel": mel, "encoder": enc, "prompt": prompt[0], "prompt_logits": logits,
    "steps": mx.array(steps, dtype=mx.int32), "step_logits": mx.stack(step_logits),
})
print(f"wrote {MODEL} and {GOLDEN}: encoder {enc.shape}, logits {logits.shape}, |logits| max {mx.abs(logits).max().item():.3f}")
