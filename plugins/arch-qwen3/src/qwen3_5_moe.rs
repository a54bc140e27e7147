//! model_type `qwen3_5_moe` (Qwen3.5 / Qwen3.6 MoE hybrids, e.g.
//! Qwen3.6-35B-A3B), text model only. mlx_lm/models/qwen3_5_moe.py is
//! qwen3_5's model with one more sanitize step: the Hugging Face fused expert
//! layout (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj`)
//! split into `mlp.switch_mlp.{gate,up,down}_proj`. The config and the model
//! are qwen3_5.rs's (which builds on hybrid.rs): with `num_experts` > 0
//! every layer's feed-forward is the routed MoE plus the shared expert.
//!
//! Checkpoints are read in the layout mlx-lm writes (experts split and
//! stacked as `switch_mlp`), or with qwen3_5's Hugging Face names, conv and
//! norms (qwen3_5.rs `layout`), fused experts included: nn's `SparseMoe`
//! finds `experts.gate_up_proj` and runs it as one switch layer whose
//! output it splits into gate and up (mlx-lm splits the tensor at load;
//! the result is the same, with one expert matmul instead of two).
use crate::qwen3_5::{layout, Config};
use crate::hybrid::HybridModel;
use rmlx_plugin_api::author::{Result, Weights};

pub fn load(config_json: &str, w: &mut Weights) -> Result<HybridModel> {
    let mut c = Config::parse(config_json, "qwen3_5_moe")?;
    let (model, head) = layout(w, &mut c)?;
    HybridModel::load(c, w, model, head)
}
