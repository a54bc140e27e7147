# usage: make_dflash.py VERIFIER_DIR OUT_DIR [LAYERS]   a random DFlash drafter sidecar of the real shape
# for a qwen3-style verifier (z-lab's layout: config.json with model_type qwen3, block_size 16,
# dflash_config.{mask_token_id, target_layer_ids}; model.safetensors with fc, hidden_norm, layers.*,
# norm and no embedding or LM head: `rmlx generate --draft-kind dflash --draft-model OUT_DIR` takes
# those from the verifier). Random: its drafts are rejected, so a run checks losslessness and
# measures what a rejected block costs, not a speed-up (a real checkpoint is needed for that).
import json, sys
from pathlib import Path
import mlx.core as mx

v, out = Path(sys.argv[1]), Path(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 5
c = json.loads((v / "config.json").read_text())
c = c.get("text_config", c)
D, H, K, I, N = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"], c["num_hidden_layers"]
hd = c.get("head_dim") or D // H
targets = sorted({min(N - 1, max(0, 1 + round(i * (N - 4) / 4))) for i in range(5)})  # z-lab: [1, 9, 17, 25, 33] of 36
mx.random.seed(2)
w = lambda o, i: (mx.random.normal((o, i)) * 0.02).astype(mx.bfloat16)
one = lambda m: mx.ones((m,), dtype=mx.bfloat16)
t = {"fc.weight": w(D, len(targets) * D), "hidden_norm.weight": one(D), "norm.weight": one(D)}
for i in range(n):
    p = f"layers.{i}."
    t |= {
        p + "input_layernorm.weight": one(D), p + "post_attention_layernorm.weight": one(D),
        p + "self_attn.q_proj.weight": w(H * hd, D), p + "self_attn.k_proj.weight": w(K * hd, D),
        p + "self_attn.v_proj.weight": w(K * hd, D), p + "self_attn.o_proj.weight": w(D, H * hd),
        p + "self_attn.q_norm.weight": one(hd), p + "self_attn.k_norm.weight": one(hd),
        p + "mlp.gate_proj.weight": w(I, D), p + "mlp.up_proj.weight": w(I, D), p + "mlp.down_proj.weight": w(D, I),
    }
vocab = c["vocab_size"]
cfg = {
    "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": D, "intermediate_size": I,
    "num_hidden_layers": n, "num_attention_heads": H, "num_key_value_heads": K, "head_dim": hd,
    "rms_norm_eps": c.get("rms_norm_eps", 1e-6), "rope_theta": c.get("rope_theta", 1000000.0),
    "max_position_embeddings": c.get("max_position_embeddings", 40960), "vocab_size": vocab,
    "tie_word_embeddings": c.get("tie_word_embeddings", True), "block_size": 16, "num_target_layers": N,
    "dflash_config": {"mask_token_id": 151669 if vocab > 151669 else vocab - 1, "target_layer_ids": targets},
    "torch_dtype": "bfloat16",
}
out.mkdir(parents=True, exist_ok=True)
mx.save_safetensors(str(out / "model.safetensors"), t)
(out / "config.json").write_text(json.dumps(cfg, indent=2))
print("saved", out, "target layers", targets)
