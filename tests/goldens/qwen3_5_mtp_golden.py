#!/usr/bin/env python3
"""Golden for the Qwen3.5 multi-token-prediction head (plugins/arch-qwen3
qwen3_5_mtp.rs, a drafter head of plugin ABI 3.6), against mlx-vlm 0.7.10's
`Qwen3_5MTPDraftModel` bound to mlx-lm's `qwen3_5` model.

Run from the repo root with the dev venv: `.venv-dev/bin/python
tests/goldens/qwen3_5_mtp_golden.py`. Writes
- tests/fixtures/models/qwen3_5-mtp-f32/: the tiny qwen3_5-f32 verifier (its
  model.safetensors is a symlink to ../qwen3_5-f32's) plus `mtp.safetensors`,
  a random head stored as Hugging Face checkpoints store it (`mtp.*`, RMSNorm
  weights as offsets from 1);
- tests/fixtures/goldens/qwen3_5-mtp/golden.json: the prompt, the verifier's
  hidden states before its final norm (the head's conditioning), its first
  greedy token, the head's logits over its prefill (the prompt shifted by
  one, then that token), and a chain of greedy draft steps, each with the
  head's logits (the chain conditions on the head's own normed output).
"""
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

import mlx_lm.utils as lm_utils
from mlx_lm.models.cache import make_prompt_cache
from mlx_vlm.speculative.drafters.qwen3_5_mtp import Qwen3_5MTPDraftModel
from mlx_vlm.speculative.drafters.qwen3_5_mtp.config import Qwen3_5MTPConfig

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "tests/fixtures/models/qwen3_5-f32"
OUT = ROOT / "tests/fixtures/models/qwen3_5-mtp-f32"
GOLDEN = ROOT / "tests/fixtures/goldens/qwen3_5-mtp/golden.json"
STEPS = 4  # chained draft steps after the prefill's proposal

NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", ".q_norm.weight", ".k_norm.weight",
         "norm.weight", "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight")


def main():
    mx.random.seed(7)
    config = json.loads((SRC / "config.json").read_text())
    model, _ = lm_utils.load_model(SRC)
    model.set_dtype(mx.float32)

    head = Qwen3_5MTPDraftModel(Qwen3_5MTPConfig.from_dict({"model_type": "qwen3_5_mtp", "text_config": config["text_config"]}))
    # Random weights of a useful size, norms off 1 so the +1 offset matters.
    params = {}
    for k, v in tree_flatten(head.parameters()):
        if any(k.endswith(s) for s in NORMS):
            params[k] = 1.0 + 0.2 * mx.random.normal(v.shape)
        else:
            params[k] = 0.08 * mx.random.normal(v.shape)
    head.load_weights(list(params.items()))
    head.set_dtype(mx.float32)
    head.reset(model)

    # The verifier: prompt -> hidden states before the final norm, and its first token.
    prompt = [3, 17, 42, 99, 5, 200, 64, 7, 128, 31, 250, 12]
    lm = model.language_model
    final_norm = lm.model.norm
    lm.model.norm = lambda h: h  # keep the residual stream as it leaves the last block
    cache = make_prompt_cache(model)
    hidden = lm.model(mx.array([prompt]), cache=cache)  # [1, n, D]
    lm.model.norm = final_norm
    logits = lm.model.embed_tokens.as_linear(final_norm(hidden))
    first = int(mx.argmax(logits[0, -1]).item())

    # The head's prefill, as prefill_from_target_hidden runs it: tokens shifted by one.
    shifted = mx.array([prompt[1:] + [first]])
    head._next_position = 0
    state = head._forward_tokens(shifted, hidden, mx.int32)  # normed [1, n, D]
    prefill_logits = head._lm_head_fn(state)  # [1, n, V]
    tok = int(mx.argmax(prefill_logits[0, -1]).item())
    chain = [{"token": tok}]
    h_prev = state[:, -1:, :]
    for _ in range(STEPS):
        h_prev = head._forward_tokens(mx.array([[tok]]), h_prev, mx.int32)
        lg = head._lm_head_fn(h_prev)[0, -1]
        chain[-1]["logits"] = np.array(lg).tolist()
        tok = int(mx.argmax(lg).item())
        chain.append({"token": tok})
    chain.pop()  # the last proposal's logits were not computed

    # mlx-vlm's own round loop proposes the same tokens.
    head.reset(model)
    head.prefill_from_target_hidden(mx.array([prompt]), hidden, first, sampler=None, greedy=True)
    block = head.draft_block(first, hidden[:, -1:, :], None, STEPS + 1, sampler=None, greedy=True)
    want = [c["token"] for c in chain]
    assert np.array(block)[0].tolist()[: len(want)] == want, (np.array(block), want)

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    link = OUT / "model.safetensors"
    if not link.is_symlink():
        if link.exists():
            link.unlink()
        os.symlink("../qwen3_5-f32/model.safetensors", link)
    hf = {}
    for k, v in tree_flatten(head.parameters()):
        hf["mtp." + k] = v - 1.0 if any(k.endswith(s) for s in NORMS) else v
    mx.save_safetensors(str(OUT / "mtp.safetensors"), hf, metadata={"format": "mlx"})

    top2 = lambda row: float(np.sort(np.array(row))[-1] - np.sort(np.array(row))[-2])
    GOLDEN.write_text(json.dumps({
        "prompt": prompt,
        "first": first,
        "hidden": np.array(hidden[0]).tolist(),
        "verifier_last_logits": np.array(logits[0, -1]).tolist(),
        "prefill_logits": np.array(prefill_logits[0]).tolist(),
        "chain": chain,
        "margins": [top2(c["logits"]) for c in chain],
    }) + "\n")
    print("first", first, "draft", want, "fixture", OUT, "golden", GOLDEN.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
