# Random-weight Qwen3 shapes built with mlx-lm's own classes, saved with save_model.
import json, sys
from pathlib import Path
import mlx.core as mx, mlx.nn as nn
from mlx_lm.models import qwen3
from mlx_lm.utils import save_model
SHAPES = {
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, intermediate_size=3072, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
    "4b": dict(hidden_size=2560, num_hidden_layers=36, intermediate_size=9728, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128),
}
name, quant, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
cfg = dict(model_type="qwen3", rms_norm_eps=1e-6, vocab_size=151936, max_position_embeddings=40960,
           rope_theta=1000000.0, tie_word_embeddings=True, **SHAPES[name])
mx.random.seed(0)
m = qwen3.Model(qwen3.ModelArgs.from_dict(cfg))
m.set_dtype(mx.bfloat16)
if quant == "q4":
    nn.quantize(m, 64, 4)
    cfg["quantization"] = {"group_size": 64, "bits": 4}
mx.eval(m.parameters())
out.mkdir(parents=True, exist_ok=True)
save_model(out, m)
cfg["torch_dtype"] = "bfloat16"
(out / "config.json").write_text(json.dumps(cfg))
print("saved", out)
