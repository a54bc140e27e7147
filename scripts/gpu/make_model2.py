# Random-weight models of real shapes for the GPU runs, built with mlx-lm's own classes and saved
# with save_model (rmlx and mlx-lm read the same files). Quantized layer by layer, so a 30B model
# never lives in float32 or bfloat16 whole.
#   make_model2.py 30b-a3b q4 DIR    Qwen3-30B-A3B's shape (qwen3_moe: 48 layers, 128 experts, top 8)
#   make_model2.py hybrid-2b bf16 DIR a Qwen3.5 gated-DeltaNet hybrid of 2B class (qwen3_5 text:
#                                     24 layers, every 4th full attention)
import json, sys
from pathlib import Path
import mlx.core as mx, mlx.nn as nn
from mlx_lm.models import qwen3_moe, qwen3_5
from mlx_lm.utils import save_model

SHAPES = {
    "30b-a3b": (qwen3_moe, dict(
        model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, intermediate_size=6144,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, rms_norm_eps=1e-6, vocab_size=151936, rope_theta=1000000.0,
        max_position_embeddings=40960, tie_word_embeddings=False)),
    "hybrid-2b": (qwen3_5, dict(
        model_type="qwen3_5", hidden_size=2048, num_hidden_layers=24, intermediate_size=6144,
        num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_value_heads=16,
        linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, full_attention_interval=4, rms_norm_eps=1e-6, vocab_size=151936,
        max_position_embeddings=262144, tie_word_embeddings=True, partial_rotary_factor=0.25,
        rope_theta=10000000.0)),
}
name, quant, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
module, cfg = SHAPES[name]
mx.random.seed(0)
m = module.Model(module.ModelArgs.from_dict(cfg))
def finish(mod):
    mod.set_dtype(mx.bfloat16)
    if quant == "q4":
        nn.quantize(mod, 64, 4)
    mx.eval(mod.parameters())
# layer by layer, then what is left (embeddings, norm, head)
inner = m.language_model.model if hasattr(m, "language_model") else m.model
for layer in inner.layers:
    finish(layer)
finish(m)
if quant == "q4":
    cfg["quantization"] = {"group_size": 64, "bits": 4}
out.mkdir(parents=True, exist_ok=True)
save_model(out, m)
cfg["torch_dtype"] = "bfloat16"
(out / "config.json").write_text(json.dumps(cfg))
print("saved", out)
