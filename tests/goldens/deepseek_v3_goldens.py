#!/usr/bin/env python3
"""Goldens for `deepseek_v3` (plugins/arch-deepseek deepseek_v3.rs) against
mlx-lm 0.32.2's own model, and for its multi-token-prediction head
(deepseek_v3_mtp.rs) against a reference written here from the published
definition (DeepSeek-V3 report section 2.2, as vLLM and SGLang serve it),
whose decoder layer is mlx-lm's `DeepseekV3DecoderLayer`.

Run from the repo root with the dev venv:
`.venv-dev/bin/python tests/goldens/deepseek_v3_goldens.py`. Writes
- tests/fixtures/models/deepseek_v3-f32/: a tiny random deepseek_v3 as
  mlx-lm saves it (per-head `embed_q` / `unembed_out`, experts stacked in
  `switch_mlp`), and tests/fixtures/goldens/deepseek_v3-f32.json: mlx-lm's
  greedy tokens and logits on it, in make_goldens.py's format;
- tests/fixtures/models/deepseek_v3-mtp-f32/: the same weights in Hugging
  Face's layout (`kv_b_proj`, experts one by one), plus the MTP module as
  layer `num_hidden_layers` (random), `num_nextn_predict_layers` 1;
- tests/fixtures/goldens/deepseek_v3-mtp/golden.json: the prompt, the
  verifier's hidden states before its final norm, its first greedy token,
  the head's logits over its prefill (the prompt shifted by one, then that
  token), and a chain of greedy draft steps, each with the head's logits.

- tests/fixtures/models/deepseek_v3-q4-g32/ and its golden: a wider tiny
  model (q_lora_rank, kv_lora_rank, qk_nope, v and the experts' width 32, so
  that group size 32 divides every projection's input, the per-head
  `embed_q` / `unembed_out` included) quantized by mlx-lm's
  `quantize_model` (affine 4-bit, g32; the router `gate` stays float, as
  mlx-lm leaves it), reloaded by `load_model` before recording.

The tiny config: hidden 32, 2 layers (layer 0 dense by
`first_k_dense_replace` 1, layer 1 MoE), 2 heads, q_lora_rank 16,
kv_lora_rank 16, qk_nope 8 / qk_rope 4 / v 8 (so key and value head sizes
differ), 4 routed experts in 2 groups (best 1 group, top-2), 1 shared
expert, routed_scaling_factor 2.5, YaRN rope_scaling with a factor of 4 and
mscale_all_dim 0.8 (so both YaRN scales matter), vocab 64.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_goldens as mg  # noqa: E402  (sets the CPU device first)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

import mlx_lm.utils as lm_utils  # noqa: E402
from mlx_lm.models import deepseek_v3  # noqa: E402
from mlx_lm.models.base import create_attention_mask  # noqa: E402
from mlx_lm.models.cache import KVCache, make_prompt_cache  # noqa: E402

NAME = "deepseek_v3-f32"
MTP_NAME = "deepseek_v3-mtp-f32"
MTP_GOLDEN = mg.GOLDENS_DIR / "deepseek_v3-mtp" / "golden.json"
STEPS = 4  # chained draft steps after the prefill's proposal

CONFIG = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 32,
    "moe_intermediate_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "n_shared_experts": 1,
    "n_routed_experts": 4,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "qk_nope_head_dim": 8,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "n_group": 2,
    "topk_group": 1,
    "num_experts_per_tok": 2,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8},
    "attention_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 0,
    "eos_token_id": 1,
}
SEED = 9130
PROMPTS = [[42], [3, 17, 9, 60, 5, 33, 21], [(i * 37 + 11) % 64 for i in range(23)]]
QUANT_NAME = "deepseek_v3-q4-g32"
QUANT_CONFIG = {**CONFIG, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "v_head_dim": 32,
                "moe_intermediate_size": 32}
MTP_PROMPT = [3, 17, 42, 9, 5, 60, 14, 7, 28, 31, 50, 12]


def randomize(params, seed):
    """Norm weights 1 + N(0, 0.1²), the router's correction bias N(0, 0.5²)
    (so it changes the choice), everything else N(0, 0.1²)."""
    mx.random.seed(seed)
    out = []
    for path, v in params:
        if path.endswith("norm.weight"):
            w = 1.0 + mg.NORM_STD * mx.random.normal(v.shape, dtype=mx.float32)
        elif path.endswith("e_score_correction_bias"):
            w = 0.5 * mx.random.normal(v.shape, dtype=mx.float32)
        else:
            w = mg.WEIGHT_STD * mx.random.normal(v.shape, dtype=mx.float32)
        out.append((path, w))
    return out


def hf_layer(prefix, params, config):
    """One mlx-lm decoder layer's parameters under Hugging Face's names:
    `kv_b_proj` from `embed_q` / `unembed_out` (the inverse of mlx-lm's
    sanitize), experts one by one."""
    h, nope = config["num_attention_heads"], config["qk_nope_head_dim"]
    out = {}
    for k, v in params.items():
        if k.endswith("self_attn.embed_q.weight"):
            wk = v.swapaxes(-1, -2)  # [H, nope, r]
            wv = params[k.replace("embed_q", "unembed_out")]  # [H, v, r]
            kv_b = mx.concatenate([wk, wv], axis=1).reshape(h * (nope + wv.shape[1]), -1)
            out[f"{prefix}.{k.replace('embed_q', 'kv_b_proj')}"] = kv_b
        elif k.endswith("self_attn.unembed_out.weight"):
            continue
        elif ".switch_mlp." in k:
            for e in range(v.shape[0]):
                out[f"{prefix}.{k.replace('switch_mlp.', f'experts.{e}.')}"] = v[e]
        else:
            out[f"{prefix}.{k}"] = v
    return out


def main():
    mg.MODELS_DIR.mkdir(parents=True, exist_ok=True)
    args = deepseek_v3.ModelArgs.from_dict(CONFIG)
    model = deepseek_v3.Model(args)
    params = randomize(tree_flatten(model.parameters()), SEED)
    model.update(tree_unflatten(params))
    model.eval()
    mx.eval(model.parameters())

    # mlx-lm's layout, and its golden from the files as mlx-lm reads them back.
    mg.save(NAME, model, CONFIG)
    model, _ = lm_utils.load_model(mg.MODELS_DIR / NAME)
    mg.PROMPTS = PROMPTS
    min_margin, max_dev = mg.golden(NAME, model)
    mg.log(f"{NAME}: min top1-top2 margin {min_margin:.2g}, one-pass-prefill max |dlogit| {max_dev:.2g}")

    # The quantized variant, from its own float weights.
    qmodel = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(QUANT_CONFIG))
    qmodel.update(tree_unflatten(randomize(tree_flatten(qmodel.parameters()), SEED + 3)))
    qmodel.eval()
    qmodel, qconfig = lm_utils.quantize_model(qmodel, dict(QUANT_CONFIG), 32, 4, mode="affine")
    quantized = [k for k, m in qmodel.named_modules() if type(m).__name__.startswith("Quantized")]
    assert any(k.endswith("embed_q") for k in quantized) and any("switch_mlp" in k for k in quantized), quantized
    mg.save(QUANT_NAME, qmodel, qconfig)
    qmodel, _ = lm_utils.load_model(mg.MODELS_DIR / QUANT_NAME)
    min_margin, max_dev = mg.golden(QUANT_NAME, qmodel)
    mg.log(f"{QUANT_NAME}: {len(quantized)} quantized modules, min margin {min_margin:.2g}, max |dlogit| {max_dev:.2g}")

    # The MTP module: mlx-lm's decoder layer at index num_hidden_layers (MoE).
    n = CONFIG["num_hidden_layers"]
    layer = deepseek_v3.DeepseekV3DecoderLayer(args, n)
    lp = randomize(tree_flatten(layer.parameters()), SEED + 1)
    layer.update(tree_unflatten(lp))
    layer.eval()
    d = CONFIG["hidden_size"]
    mtp = dict(randomize([("enorm.weight", mx.zeros((d,))), ("hnorm.weight", mx.zeros((d,))),
                          ("eh_proj.weight", mx.zeros((d, 2 * d))), ("shared_head.norm.weight", mx.zeros((d,)))], SEED + 2))
    eps = CONFIG["rms_norm_eps"]
    rms = lambda x, w: mx.fast.rms_norm(x, w, eps)  # noqa: E731
    inner = model.model

    def head_step(tokens, cond, cache):
        """tokens [1, L], cond [1, L, D] (the verifier's residual, or the
        head's own h) -> (h, logits)."""
        e = inner.embed_tokens(tokens)
        c = rms(cond, inner.norm.weight)  # the verifier's final norm
        x = mx.concatenate([rms(e, mtp["enorm.weight"]), rms(c, mtp["hnorm.weight"])], axis=-1)
        x = x @ mtp["eh_proj.weight"].T
        mask = create_attention_mask(x, cache, return_array=True)
        h = layer(x, mask, cache)
        logits = model.lm_head(rms(h, mtp["shared_head.norm.weight"]))
        return h, logits

    # The verifier: prompt -> hidden states before the final norm, first token.
    final_norm = inner.norm
    inner.norm = lambda h: h
    hidden = inner(mx.array([MTP_PROMPT]), cache=make_prompt_cache(model))  # [1, n, D]
    inner.norm = final_norm
    logits = model.lm_head(final_norm(hidden))
    first = int(mx.argmax(logits[0, -1]).item())

    cache = KVCache()
    h, prefill_logits = head_step(mx.array([MTP_PROMPT[1:] + [first]]), hidden, cache)
    tok = int(mx.argmax(prefill_logits[0, -1]).item())
    chain = [{"token": tok}]
    h_prev = h[:, -1:, :]
    for _ in range(STEPS):
        h_prev, lg = head_step(mx.array([[tok]]), h_prev, cache)
        chain[-1]["logits"] = np.array(lg[0, -1]).tolist()
        tok = int(mx.argmax(lg[0, -1]).item())
        chain.append({"token": tok})
    chain.pop()  # the last proposal's logits were not computed

    # Hugging Face's layout of the same verifier, plus the module.
    out = mg.MODELS_DIR / MTP_NAME
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        f.unlink()
    weights = {}
    main_params = dict(tree_flatten(model.parameters()))
    for i in range(n):
        pre = f"model.layers.{i}."
        weights.update(hf_layer(f"model.layers.{i}", {k[len(pre):]: v for k, v in main_params.items() if k.startswith(pre)}, CONFIG))
    for k, v in main_params.items():
        if not k.startswith("model.layers."):
            weights[k] = v
    weights.update(hf_layer(f"model.layers.{n}", dict(tree_flatten(layer.parameters())), CONFIG))
    for k, v in mtp.items():
        weights[f"model.layers.{n}.{k}"] = v
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    config = {**CONFIG, "num_nextn_predict_layers": 1}
    (out / "config.json").write_text(json.dumps(config, indent=4) + "\n")

    top2 = lambda row: float(np.sort(np.array(row))[-1] - np.sort(np.array(row))[-2])  # noqa: E731
    MTP_GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    MTP_GOLDEN.write_text(json.dumps({
        "prompt": MTP_PROMPT,
        "first": first,
        "hidden": [[mg.r7(v) for v in row] for row in np.array(hidden[0]).tolist()],
        "verifier_last_logits": [mg.r7(v) for v in np.array(logits[0, -1]).tolist()],
        "prefill_logits": [[mg.r7(v) for v in row] for row in np.array(prefill_logits[0]).tolist()],
        "chain": [{"token": c["token"], "logits": [mg.r7(v) for v in c["logits"]]} for c in chain],
        "margins": [top2(c["logits"]) for c in chain],
    }) + "\n")
    sizes = {p.name: p.stat().st_size for p in [mg.MODELS_DIR / NAME / "model.safetensors", out / "model.safetensors", MTP_GOLDEN]}
    mg.log(f"first {first}, draft {[c['token'] for c in chain]}, margins {[round(top2(c['logits']), 4) for c in chain]}, sizes {sizes}")


if __name__ == "__main__":
    main()
