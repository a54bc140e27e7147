#!/usr/bin/env python3
"""Golden for the Eagle-3 drafter head (plugins/arch-llama llama_eagle3.rs, a
drafter head of plugin ABI 3.6), against mlx-vlm 0.7.10's `Eagle3DraftModel`
(mlx_vlm/speculative/drafters/eagle3) bound to mlx-lm's llama model.

Run from the repo root with the dev venv: `.venv-dev/bin/python
tests/goldens/eagle3_golden.py`. Writes
- tests/fixtures/models/llama-eagle3-head/: a tiny random Eagle-3 head stored
  as the `speculators` library stores one (config.json with
  `transformer_layer_config`, `model_type` "speculator_model"; tensors
  `fc`, `layers.0.*` with `hidden_norm`, `norm`, `lm_head` over a draft
  vocabulary of 160 tokens, `d2t` int64 and `t2d` bool), without the
  embedding, which it shares with its verifier tests/fixtures/models/llama-f32;
- tests/fixtures/goldens/eagle3/golden.json: the prompt, the verifier's
  hidden states at the three layers the head reads (concatenated in the
  head's order: the conditioning), its first greedy token, the hot ids
  (draft id i is target id i + d2t[i]), the head's draft-vocabulary logits
  over its prefill (the prompt shifted by one, then that token), and a chain
  of greedy draft steps, each with the head's logits (the chain conditions on
  the head's own output before its final norm).
"""
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import mlx_lm.utils as lm_utils
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache
from mlx_vlm.speculative.drafters.eagle3 import Eagle3DraftModel
from mlx_vlm.speculative.drafters.eagle3.config import Eagle3Config

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "tests/fixtures/models/llama-f32"
OUT = ROOT / "tests/fixtures/models/llama-eagle3-head"
GOLDEN = ROOT / "tests/fixtures/goldens/eagle3/golden.json"
STEPS = 4  # chained draft steps after the prefill's proposal
DRAFT_VOCAB = 160

NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "hidden_norm.weight", "norm.weight")

CONFIG = {
    "architectures": ["Eagle3Speculator"],
    "model_type": "speculator_model",
    "speculators_model_type": "eagle3",
    "transformer_layer_config": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "vocab_size": 256,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
    },
    "draft_vocab_size": DRAFT_VOCAB,
    "norm_before_residual": True,
    # Hugging Face hidden-state indices: layer i - 1's output (clamped at 0).
    "eagle_aux_hidden_state_layer_ids": [1, 2, 1],
    "tie_word_embeddings": False,
}


def main():
    mx.random.seed(11)
    rng = np.random.default_rng(11)
    model, _ = lm_utils.load_model(SRC)
    model.set_dtype(mx.float32)

    head = Eagle3DraftModel(Eagle3Config.from_dict(CONFIG))
    params = {}
    for k, v in tree_flatten(head.parameters()):
        if k == "d2t":
            continue
        if k.endswith(NORMS):
            params[k] = 1.0 + 0.2 * mx.random.normal(v.shape)
        else:
            params[k] = 0.08 * mx.random.normal(v.shape)
    # The draft vocabulary: 160 of the verifier's 256 ids, EOS (2) among them.
    hot = np.sort(np.concatenate([[2], rng.choice(np.delete(np.arange(256), 2), DRAFT_VOCAB - 1, replace=False)]))
    d2t = hot - np.arange(DRAFT_VOCAB)
    params["d2t"] = mx.array(d2t.astype(np.int32))
    head.load_weights(list(params.items()), strict=False)
    head.set_dtype(mx.float32)
    head.d2t = mx.array(d2t.astype(np.int32))
    head.reset(model)
    assert head.embed_tokens is model.model.embed_tokens, "the head shares the verifier's embedding"
    capture = list(head.config.capture_layer_ids)

    # The verifier: prompt -> its blocks' outputs, and its first greedy token.
    prompt = [3, 17, 42, 99, 5, 200, 64, 7, 128, 31, 250, 12]
    inner = model.model
    cache = make_prompt_cache(model)
    h = inner.embed_tokens(mx.array([prompt]))
    mask = create_attention_mask(h, cache[0])
    outs = []
    for layer, c in zip(inner.layers, cache):
        h = layer(h, mask, cache=c)
        outs.append(h)
    logits = model.lm_head(inner.norm(h))
    first = int(mx.argmax(logits[0, -1]).item())
    hidden = mx.concatenate([outs[i] for i in capture], axis=-1)  # [1, n, 3D]

    # The head's prefill, as prefill_from_target_hidden runs it.
    shifted = mx.array([prompt[1:] + [first]])
    head._next_position = 1
    state = head._forward_tokens(shifted, hidden, mx.int32)  # [1, n, D], before the final norm
    prefill_logits = head._logits(state)  # [1, n, draft vocab]
    to_target = lambda lg: int(hot[int(mx.argmax(lg).item())])
    tok = to_target(prefill_logits[0, -1])
    chain = [{"token": tok}]
    h_prev = state[:, -1:, :]
    for _ in range(STEPS):
        h_prev = head._forward_tokens(mx.array([[tok]]), h_prev, mx.int32)
        lg = head._logits(h_prev)[0, -1]
        chain[-1]["logits"] = np.array(lg).tolist()
        tok = to_target(lg)
        chain.append({"token": tok})
    chain.pop()  # the last proposal's logits were not computed

    # mlx-vlm's own round loop proposes the same tokens.
    head.reset(model)
    head.prefill_from_target_hidden(mx.array([prompt]), hidden, first, sampler=None, greedy=True)
    block = head.draft_block(first, hidden[:, -1:, :], None, STEPS + 2, sampler=None, greedy=True)
    want = [c["token"] for c in chain]
    assert np.array(block)[0].tolist()[: len(want)] == want, (np.array(block), want)

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "config.json").write_text(json.dumps(CONFIG, indent=4) + "\n")
    tensors = {k: v for k, v in tree_flatten(head.parameters()) if not k.startswith("embed_tokens")}
    tensors["d2t"] = mx.array(d2t.astype(np.int64))
    t2d = np.zeros(256, dtype=bool)
    t2d[hot] = True
    tensors["t2d"] = mx.array(t2d)
    mx.save_safetensors(str(OUT / "model.safetensors"), tensors, metadata={"format": "pt"})

    top2 = lambda row: float(np.sort(np.array(row))[-1] - np.sort(np.array(row))[-2])
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({
        "prompt": prompt,
        "first": first,
        "capture_layers": capture,
        "hot": hot.tolist(),
        "hidden": np.array(hidden[0]).tolist(),
        "verifier_last_logits": np.array(logits[0, -1]).tolist(),
        "prefill_logits": np.array(prefill_logits[0]).tolist(),
        "chain": chain,
        "margins": [top2(c["logits"]) for c in chain],
    }) + "\n")
    print("first", first, "capture", capture, "draft", want, "fixture", OUT, "golden", GOLDEN.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
