# usage: add_mtp.py DIR   adds a random multi-token-prediction head (`mtp.*`, one layer, stored as
# Hugging Face stores Qwen3.5's: RMSNorm weights as offsets from 1) to a qwen3_5 model made by
# make_model2.py, in DIR/mtp.safetensors (listed in the index when DIR has one), so that
# `rmlx serve --draft-kind mtp` loads a head of the real shape. Random: its drafts are rejected,
# so a run measures speculation's cost with every step rolling the recurrent state back.
import json, sys
from pathlib import Path
import mlx.core as mx

d = Path(sys.argv[1])
c = json.loads((d / "config.json").read_text())
c = c.get("text_config", c)
D, H, K, hd, I = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c.get("head_dim", c["hidden_size"] // c["num_attention_heads"]), c["intermediate_size"]
mx.random.seed(1)
w = lambda o, i: (mx.random.normal((o, i)) * 0.02).astype(mx.bfloat16)
z = lambda n: mx.zeros((n,), dtype=mx.bfloat16)  # offsets from 1
p = "mtp.layers.0."
t = {
    "mtp.fc.weight": w(D, 2 * D), "mtp.norm.weight": z(D),
    "mtp.pre_fc_norm_embedding.weight": z(D), "mtp.pre_fc_norm_hidden.weight": z(D),
    p + "input_layernorm.weight": z(D), p + "post_attention_layernorm.weight": z(D),
    p + "self_attn.q_proj.weight": w(2 * H * hd, D), p + "self_attn.k_proj.weight": w(K * hd, D),
    p + "self_attn.v_proj.weight": w(K * hd, D), p + "self_attn.o_proj.weight": w(D, H * hd),
    p + "self_attn.q_norm.weight": z(hd), p + "self_attn.k_norm.weight": z(hd),
    p + "mlp.gate_proj.weight": w(I, D), p + "mlp.up_proj.weight": w(I, D), p + "mlp.down_proj.weight": w(D, I),
}
mx.save_safetensors(str(d / "mtp.safetensors"), t)
idx = d / "model.safetensors.index.json"
if idx.is_file():
    j = json.loads(idx.read_text())
    j["weight_map"].update({k: "mtp.safetensors" for k in t})
    idx.write_text(json.dumps(j))
print("added", len(t), "mtp tensors to", d)
