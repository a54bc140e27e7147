//! model_type `qwen3_next` (Qwen3-Next-80B-A3B): a hybrid of gated DeltaNet
//! (linear attention with a recurrent state) and gated full attention, with
//! MoE feed-forwards that add a shared expert. Mirrors
//! mlx_lm/models/qwen3_next.py:
//! - layer i mixes with gated DeltaNet when (i + 1) % `full_attention_interval`
//!   != 0 (`linear_attn`: fused `in_proj_qkvz` and `in_proj_ba`, whose heads
//!   are interleaved per key head, the causal conv, the gated delta rule,
//!   the gated RMSNorm; plugins/nn gated_delta.rs), else with full attention
//!   (`self_attn`): `q_proj` yields queries and an output gate per head,
//!   per-head q/k RMSNorm, RoPE over the first `head_dim *
//!   partial_rotary_factor` dims (`rope_scaling` as mlx-lm's
//!   `initialize_rope`), output `o_proj(o * sigmoid(gate))`;
//! - layer i's feed-forward is the MoE block when i is not in
//!   `mlp_only_layers`, `num_experts` > 0 and (i + 1) % `decoder_sparse_step`
//!   == 0: softmax top-`num_experts_per_tok` routing (renormalised when
//!   `norm_topk_prob`), SwiGLU experts of `moe_intermediate_size`, plus a
//!   shared expert of `shared_expert_intermediate_size` scaled by
//!   sigmoid(`shared_expert_gate`); else the dense SwiGLU of
//!   `intermediate_size`;
//! - the head tied to the embedding when `tie_word_embeddings`.
//!
//! The engine keeps each DeltaNet layer's state (conv state [B, K-1, C] and
//! SSM state [B, Hv, Dv, Dk]) as plugin-api 3.3 `cache_kind::STATE`; the
//! attention layers cache K/V as usual.
//!
//! Shapes: B batch, L new tokens, D hidden, H query heads, K kv heads,
//! hd head_dim, Hk/Hv linear key/value heads, Dk/Dv their sizes,
//! E experts, V vocab.
//!
//! The layers are hybrid.rs's (shared with qwen3_5); this file is the config
//! and how it maps onto them.
use crate::hybrid::{Hybrid, HybridModel, Projections};
use rmlx_nn::gated_delta::DeltaDims;
use rmlx_nn::parse_config;
use rmlx_plugin_api::{
    author::{Result, Weights},
    PluginError,
};
use serde::Deserialize;
use serde_json::Value;

// ---- config ----

/// The keys mlx-lm's qwen3_next `ModelArgs` reads (required there unless it
/// gives a default), plus keys of the real configs it does not read that
/// would change the computation if they disagreed (checked).
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    pub hidden_size: i32,
    pub num_hidden_layers: i32,
    pub intermediate_size: i32,
    pub num_attention_heads: i32,
    pub linear_num_value_heads: i32,
    pub linear_num_key_heads: i32,
    pub linear_key_head_dim: i32,
    pub linear_value_head_dim: i32,
    pub linear_conv_kernel_dim: i32,
    pub num_experts: i32,
    pub num_experts_per_tok: i32,
    pub decoder_sparse_step: i32,
    pub shared_expert_intermediate_size: i32,
    pub mlp_only_layers: Vec<i32>,
    pub moe_intermediate_size: i32,
    pub rms_norm_eps: f32,
    pub vocab_size: i32,
    pub num_key_value_heads: i32,
    pub rope_theta: f32,
    pub partial_rotary_factor: f32,
    pub max_position_embeddings: i32,
    pub head_dim: i32,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o: the linear layers take them from the checkpoint.
    #[serde(default)]
    pub attention_bias: bool,
    pub rope_scaling: Option<Value>,
    #[serde(default = "four")]
    pub full_attention_interval: i32,
    // Not read by mlx-lm; checked against what it does.
    pub hidden_act: Option<String>,
    /// Hugging Face's per-layer kinds; must agree with `full_attention_interval`.
    pub layer_types: Option<Vec<String>>,
}

fn four() -> i32 {
    4
}

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let c: Config = parse_config(json)?;
        c.hybrid().check()?;
        if let Some(a) = c.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(PluginError::config(format!("hidden_act `{a}` is not supported (qwen3_next uses silu)")));
        }
        Ok(c)
    }

    /// What the shared hybrid code needs.
    pub fn hybrid(&self) -> Hybrid {
        Hybrid {
            model_type: "qwen3_next",
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            delta: DeltaDims {
                hidden: self.hidden_size,
                k_heads: self.linear_num_key_heads,
                v_heads: self.linear_num_value_heads,
                k_dim: self.linear_key_head_dim,
                v_dim: self.linear_value_head_dim,
                conv_kernel: self.linear_conv_kernel_dim,
                eps: self.rms_norm_eps,
            },
            num_experts: self.num_experts,
            num_experts_per_tok: self.num_experts_per_tok,
            decoder_sparse_step: self.decoder_sparse_step,
            mlp_only_layers: self.mlp_only_layers.clone(),
            moe_intermediate_size: self.moe_intermediate_size,
            shared_expert_intermediate_size: self.shared_expert_intermediate_size,
            norm_topk_prob: self.norm_topk_prob,
            rms_norm_eps: self.rms_norm_eps,
            vocab_size: self.vocab_size,
            rope_theta: self.rope_theta,
            partial_rotary_factor: self.partial_rotary_factor,
            rope_scaling: self.rope_scaling.clone(),
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            full_attention_interval: self.full_attention_interval,
            layer_types: self.layer_types.clone(),
            attention_bias: self.attention_bias,
            projections: Projections::Fused,
            hf_layout: false,
        }
    }
}

// ---- model ----

pub fn load(config_json: &str, w: &mut Weights) -> Result<HybridModel> {
    let c = Config::parse(config_json)?;
    let mut h = c.hybrid();
    // mlx-lm's qwen3_next sanitize takes a checkpoint whose experts are
    // stored one by one for the Hugging Face layout: besides stacking the
    // experts (`SparseMoe::load` does) it moves the conv1d weights to
    // [C, K, 1] and adds 1 to the RMSNorm weights (`Hybrid::norm`).
    h.hf_layout = (0..h.num_hidden_layers).any(|i| w.contains(&format!("model.layers.{i}.mlp.experts.0.up_proj.weight")));
    HybridModel::load(h, w, "model.", "lm_head")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""model_type":"qwen3_next","hidden_size":64,"num_hidden_layers":4,"intermediate_size":128,
        "num_attention_heads":4,"linear_num_value_heads":4,"linear_num_key_heads":2,"linear_key_head_dim":16,
        "linear_value_head_dim":16,"linear_conv_kernel_dim":4,"num_experts":4,"num_experts_per_tok":2,
        "decoder_sparse_step":1,"shared_expert_intermediate_size":64,"mlp_only_layers":[1],
        "moe_intermediate_size":64,"rms_norm_eps":1e-6,"vocab_size":256,"num_key_value_heads":2,
        "rope_theta":10000.0,"partial_rotary_factor":0.25,"max_position_embeddings":512,"head_dim":16,
        "full_attention_interval":2"#;

    fn json(extra: &str) -> Value {
        let mut v: Value = serde_json::from_str(&format!("{{{BASE}}}")).unwrap();
        let extra: Value = serde_json::from_str(&format!("{{{}}}", extra.trim_start_matches(','))).unwrap();
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    fn err(extra: &str) -> String {
        Config::parse(&json(extra).to_string()).unwrap_err().message.to_string()
    }

    #[test]
    fn layer_kinds_follow_the_interval() {
        let c = Config::parse(&json("").to_string()).unwrap().hybrid();
        assert_eq!((0..4).map(|i| c.is_linear(i)).collect::<Vec<_>>(), [true, false, true, false]);
        assert_eq!((0..4).map(|i| c.is_sparse(i)).collect::<Vec<_>>(), [true, false, true, true]);
        assert_eq!(c.rope_dims(), 4);
    }

    #[test]
    fn refuses_what_it_does_not_implement_by_name() {
        assert!(err(r#","rope_scaling":{"type":"longrope"}"#).contains("longrope"));
        assert!(err(r#","hidden_act":"gelu""#).contains("hidden_act"));
        assert!(err(r#","linear_num_value_heads":3"#).contains("linear_num_value_heads"));
        assert!(err(r#","partial_rotary_factor":0.1"#).contains("partial_rotary_factor"));
        assert!(err(r#","full_attention_interval":0"#).contains("full_attention_interval"));
        assert!(err(r#","linear_conv_kernel_dim":1"#).contains("linear_conv_kernel_dim"));
        let types = r#","layer_types":["linear_attention","linear_attention","linear_attention","full_attention"]"#;
        assert!(err(types).contains("layer_types[1]"));
        for key in ["linear_num_key_heads", "shared_expert_intermediate_size", "partial_rotary_factor", "mlp_only_layers"] {
            let mut v = json("");
            v.as_object_mut().unwrap().remove(key);
            let e = Config::parse(&v.to_string()).unwrap_err().message.to_string();
            assert!(e.contains(&format!("missing field `{key}`")), "{e}");
        }
        let ok = r#","layer_types":["linear_attention","full_attention","linear_attention","full_attention"],"hidden_act":"silu""#;
        assert!(Config::parse(&json(ok).to_string()).is_ok());
    }
}
