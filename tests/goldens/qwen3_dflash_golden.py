#!/usr/bin/env python3
"""Golden for the DFlash block-diffusion drafter (plugins/arch-qwen3
qwen3_dflash.rs, a drafter head of plugin ABI 3.6), against mlx-vlm 0.7.10's
`DFlashDraftModel` (mlx_vlm/speculative/drafters/qwen3_dflash) bound to
mlx-lm's qwen3 model.

Run from the repo root with the dev venv: `.venv-dev/bin/python
tests/goldens/qwen3_dflash_golden.py`. Writes
- tests/fixtures/models/qwen3-dflash-f32/: a random tiny drafter as DFlash
  sidecar checkpoints store it (config.json with `model_type: qwen3`,
  `block_size`, `dflash_config.{mask_token_id, target_layer_ids}`;
  model.safetensors with `fc`, `hidden_norm`, `layers.*`, `norm`, no
  embedding or LM head: those are the verifier's, tests/fixtures/models/
  qwen3-f32, which the host reads beside it: `LoadedModel::load_head_from`);
- tests/fixtures/goldens/qwen3-dflash/golden.json: the prompt, the
  verifier's hidden states of the target layers over it (concatenated, the
  drafter's conditioning), its first greedy token, and three draft rounds
  run the way mlx-vlm's round loop runs them: each round's context rows (the
  hidden states the drafter's cache takes in that round), its block
  [bonus, mask ...] and the drafter's logits for the masked positions; after
  each round the verifier scores [bonus, drafts] and keeps its greedy walk,
  whose hidden states are the next round's context; and the first round's
  logits of the same drafter with `dflash_config.causal: true`.
"""
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import mlx_lm.utils as lm_utils
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache
from mlx_vlm.speculative.drafters.qwen3_dflash import DFlashDraftModel, ModelConfig

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "tests/fixtures/models/qwen3-f32"
OUT = ROOT / "tests/fixtures/models/qwen3-dflash-f32"
GOLDEN = ROOT / "tests/fixtures/goldens/qwen3-dflash/golden.json"
ROUNDS = 3

CONFIG = {
    "architectures": ["DFlashDraftModel"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "vocab_size": 256,
    "tie_word_embeddings": True,
    "block_size": 4,
    "num_target_layers": 2,
    "dflash_config": {"mask_token_id": 250, "target_layer_ids": [0, 1]},
    "torch_dtype": "float32",
}

NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", ".q_norm.weight", ".k_norm.weight",
         "norm.weight", "hidden_norm.weight")


def verifier_forward(lm, tokens, cache, layers):
    """mlx-lm's qwen3 forward, keeping the outputs of `layers`: (logits
    [1, L, V], hidden [1, L, len(layers) * D])."""
    inner = lm.model
    h = inner.embed_tokens(mx.array([tokens]))
    mask = create_attention_mask(h, cache[0])
    captured = {}
    for i, (layer, c) in enumerate(zip(inner.layers, cache)):
        h = layer(h, mask, c)
        captured[i] = h
    logits = inner.embed_tokens.as_linear(inner.norm(h))
    return logits, mx.concatenate([captured[i] for i in layers], axis=-1)


def main():
    mx.random.seed(11)
    model, _ = lm_utils.load_model(SRC)
    model.set_dtype(mx.float32)

    cfg = ModelConfig.from_dict(CONFIG)
    draft = DFlashDraftModel(cfg)
    params = {}
    for k, v in tree_flatten(draft.parameters()):
        if any(k.endswith(s) for s in NORMS):
            params[k] = 1.0 + 0.2 * mx.random.normal(v.shape)
        else:
            params[k] = 0.08 * mx.random.normal(v.shape)
    draft.load_weights(list(params.items()))
    draft.set_dtype(mx.float32)
    draft_cache = draft.reset(model)
    layers = list(cfg.target_layer_ids)
    bs, mask_id = cfg.block_size, cfg.mask_token_id

    prompt = [3, 17, 42, 99, 5, 200, 64, 7, 128, 31, 250, 12]
    cache = make_prompt_cache(model)
    logits, hidden = verifier_forward(model, prompt, cache, layers)
    first = int(mx.argmax(logits[0, -1]).item())

    rounds = []
    ctx, bonus, emitted = hidden, first, [first]
    for _ in range(ROUNDS):
        block = [bonus] + [mask_id] * (bs - 1)
        ctx_rows = np.array(ctx[0]).tolist()
        lg = draft(mx.array([block]), ctx, draft_cache)[:, 1:]  # [1, bs - 1, V]
        drafts = np.array(mx.argmax(lg[0], axis=-1)).tolist()
        # Verify [bonus, drafts]: the greedy walk, then the cache rolled back.
        vl, vh = verifier_forward(model, [bonus] + drafts, cache, layers)
        target = np.array(mx.argmax(vl[0], axis=-1)).tolist()
        n = 0
        while n < len(drafts) and drafts[n] == target[n]:
            n += 1
        new = drafts[:n] + [target[n]]
        for c in cache:
            c.trim(len(drafts) - n)
        logits_rows = np.array(lg[0])
        rounds.append({
            "context": ctx_rows,
            "block": block,
            "logits": logits_rows.tolist(),
            "drafts": drafts,
            "margins": [float(np.sort(r)[-1] - np.sort(r)[-2]) for r in logits_rows],
            "accepted": n,
            "emitted": new,
        })
        emitted += new
        ctx = vh[:, : n + 1, :]
        bonus = new[-1]

    # The same weights with `dflash_config.causal` (mlx-vlm's is_causal):
    # the first round's block attends causally.
    causal_cfg = ModelConfig.from_dict(CONFIG | {"dflash_config": CONFIG["dflash_config"] | {"causal": True}})
    causal = DFlashDraftModel(causal_cfg)
    causal.load_weights(list(params.items()))
    causal.set_dtype(mx.float32)
    causal_cache = causal.reset(model)
    causal_logits = causal(mx.array([rounds[0]["block"]]), hidden, causal_cache)[0, 1:]

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "config.json").write_text(json.dumps(CONFIG, indent=4) + "\n")
    # As DFlash sidecars store it: no `model.` prefix, norms as they are.
    # (`params`: the drafter's own tensors; after `reset` binds it, its
    # parameters would also list the verifier's embedding.)
    mx.save_safetensors(str(OUT / "model.safetensors"), {k: v.astype(mx.float32) for k, v in params.items()}, metadata={"format": "mlx"})
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({
        "prompt": prompt,
        "first": first,
        "target_layer_ids": layers,
        "block_size": bs,
        "mask_token_id": mask_id,
        "verifier_last_logits": np.array(logits[0, -1]).tolist(),
        "rounds": rounds,
        "emitted": emitted,
        "causal_round0_logits": np.array(causal_logits).tolist(),
    }) + "\n")
    print("first", first, "rounds", [(r["drafts"], r["accepted"]) for r in rounds], "golden", GOLDEN.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
