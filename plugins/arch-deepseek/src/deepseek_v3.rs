//! model_type `deepseek_v3` (DeepSeek-V3, V3.1, R1, and other checkpoints
//! that declare it, e.g. Moonlight). Mirrors mlx_lm/models/deepseek_v3.py
//! (mlx-lm 0.32.2):
//! - Multi-head Latent Attention (mla.rs): queries through a low-rank
//!   `q_a_proj` -> RMSNorm -> `q_b_proj` (or one `q_proj` when `q_lora_rank`
//!   is null), keys and values from one compressed latent of
//!   `kv_lora_rank` plus a shared RoPE key of `qk_rope_head_dim`; RoPE
//!   (traditional, YaRN when `rope_scaling` says so) only on the
//!   `qk_rope_head_dim` part; the softmax scale 1/sqrt(qk_nope + qk_rope),
//!   times YaRN's mscale(`mscale_all_dim`)² when the factor exceeds 1;
//! - layer i's feed-forward is the mixture of experts (moe.rs) when
//!   `n_routed_experts` is set, i >= `first_k_dense_replace` and
//!   i % `moe_layer_freq` == 0, else the dense SwiGLU MLP of
//!   `intermediate_size`;
//! - the output head `lm_head`, never tied (mlx-lm always builds one);
//! - `attention_bias` needs no code: a linear with a `bias` tensor adds it.
//!
//! The KV cache holds each token's latent, not per-head keys and values:
//! one KV head of `kv_lora_rank + qk_rope_head_dim` per layer (mla.rs says
//! how attention over it gives mlx-lm's result). A checkpoint's
//! `model.layers.{num_hidden_layers}.*` (the MTP module) is left for the
//! `deepseek_v3_mtp` head (deepseek_v3_mtp.rs).
//!
//! The residual stream runs as rows [N, D], N = B*L, from the embedding to
//! the final norm, so every linear gets a 2-D input (MLX's matmul adds a
//! Flatten and an Unflatten for a [B, L, D] one; the same product
//! otherwise); [B, L, ...] only for the merge of input features, the heads,
//! the host's hidden states and the logits.
//!
//! Shapes: B batch, L new tokens, N = B*L rows, D hidden, H heads, V vocab.
use crate::mla::{Mla, MlaDims};
use crate::moe::{DeepseekMoe, Routing};
use mlx_rs::Array;
use rmlx_nn::decoder::{pre_norm_residual, FeedForward, Mlp};
use rmlx_nn::{finish_rows, offer_hidden_rows, parse_config, require_positive, rms_norm, Positions, Rope};
use rmlx_plugin_api::{
    author::{Attend, EmbeddingLayer, LinearLayer, ModelImpl, Result, Weights},
    ModelSpec, PluginError,
};
use serde::Deserialize;
use serde_json::Value;

// ---- config ----

/// The keys mlx-lm's deepseek_v3 `ModelArgs` reads, with its defaults, and
/// the MTP module's `num_nextn_predict_layers`.
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    #[serde(default = "d_vocab")]
    pub vocab_size: i32,
    #[serde(default = "d_hidden")]
    pub hidden_size: i32,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: i32,
    #[serde(default = "d_moe_intermediate")]
    pub moe_intermediate_size: i32,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: i32,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i32,
    pub n_shared_experts: Option<i32>,
    pub n_routed_experts: Option<i32>,
    #[serde(default = "one")]
    pub routed_scaling_factor: f32,
    #[serde(default = "d_kv_lora")]
    pub kv_lora_rank: i32,
    /// null: queries through one `q_proj` (DeepSeek-V2-Lite's layout).
    #[serde(default = "d_q_lora")]
    pub q_lora_rank: Option<i32>,
    #[serde(default = "d_rope_dim")]
    pub qk_rope_head_dim: i32,
    #[serde(default = "d_head_dim")]
    pub v_head_dim: i32,
    #[serde(default = "d_head_dim")]
    pub qk_nope_head_dim: i32,
    #[serde(default = "d_topk_method")]
    pub topk_method: String,
    #[serde(default = "d_scoring")]
    pub scoring_func: String,
    #[serde(default = "yes")]
    pub norm_topk_prob: bool,
    #[serde(default = "one_i")]
    pub n_group: i32,
    #[serde(default = "one_i")]
    pub topk_group: i32,
    #[serde(default = "one_i")]
    pub num_experts_per_tok: i32,
    #[serde(default = "one_i")]
    pub moe_layer_freq: i32,
    #[serde(default)]
    pub first_k_dense_replace: i32,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: i32,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "d_theta")]
    pub rope_theta: f32,
    pub rope_scaling: Option<Value>,
    /// MTP modules stored after the main layers (the head reads the first).
    #[serde(default)]
    pub num_nextn_predict_layers: i32,
}

fn d_vocab() -> i32 {
    102400
}
fn d_hidden() -> i32 {
    4096
}
fn d_intermediate() -> i32 {
    11008
}
fn d_moe_intermediate() -> i32 {
    1407
}
fn d_layers() -> i32 {
    30
}
fn d_heads() -> i32 {
    32
}
fn one() -> f32 {
    1.0
}
fn one_i() -> i32 {
    1
}
fn d_kv_lora() -> i32 {
    512
}
fn d_q_lora() -> Option<i32> {
    Some(1536)
}
fn d_rope_dim() -> i32 {
    64
}
fn d_head_dim() -> i32 {
    128
}
fn d_topk_method() -> String {
    "noaux_tc".into()
}
fn d_scoring() -> String {
    "sigmoid".into()
}
fn yes() -> bool {
    true
}
fn d_max_pos() -> i32 {
    2048
}
fn d_eps() -> f32 {
    1e-6
}
fn d_theta() -> f32 {
    10000.0
}

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let c: Config = parse_config(json)?;
        c.check()?;
        Ok(c)
    }

    /// Refuses, by name, what this file does not implement.
    pub fn check(&self) -> Result<()> {
        require_positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("moe_layer_freq", self.moe_layer_freq),
        ])?;
        if let Some(r) = self.q_lora_rank {
            require_positive(&[("q_lora_rank", r)])?;
        }
        if self.qk_rope_head_dim % 2 != 0 {
            return Err(PluginError::config(format!("qk_rope_head_dim must be even, got {}", self.qk_rope_head_dim)));
        }
        if self.first_k_dense_replace < 0 || self.num_nextn_predict_layers < 0 {
            return Err(PluginError::config("first_k_dense_replace and num_nextn_predict_layers must not be negative"));
        }
        require_positive(&[("intermediate_size", self.intermediate_size)])?;
        if self.has_moe() {
            self.routing()?;
        }
        self.rope()?;
        Ok(())
    }

    /// Whether any layer can be a mixture of experts.
    fn has_moe(&self) -> bool {
        self.n_routed_experts.is_some()
    }

    /// Whether layer i's feed-forward is the mixture of experts.
    pub fn is_moe_layer(&self, i: i32) -> bool {
        self.has_moe() && i >= self.first_k_dense_replace && i % self.moe_layer_freq == 0
    }

    /// The router's settings (checked).
    pub fn routing(&self) -> Result<Routing> {
        if self.topk_method != "noaux_tc" {
            return Err(PluginError::config(format!(
                "topk_method `{}` is not supported: only DeepSeek-V3's `noaux_tc` (sigmoid scores with a \
                 correction bias, as mlx-lm's deepseek_v3)",
                self.topk_method
            )));
        }
        if self.scoring_func != "sigmoid" {
            return Err(PluginError::config(format!(
                "scoring_func `{}` is not supported: only `sigmoid` (DeepSeek-V3's router)",
                self.scoring_func
            )));
        }
        let experts = self.n_routed_experts.unwrap_or(0);
        let shared = self.n_shared_experts.unwrap_or(0);
        require_positive(&[
            ("n_routed_experts", experts),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("n_group", self.n_group),
            ("topk_group", self.topk_group),
        ])?;
        if self.n_shared_experts.is_some() && shared <= 0 {
            return Err(PluginError::config(format!("n_shared_experts must be positive or null, got {shared}")));
        }
        Routing::new(experts, self.num_experts_per_tok, self.n_group, self.topk_group, self.norm_topk_prob, self.routed_scaling_factor)
    }

    /// RoPE over the `qk_rope_head_dim` channels: traditional (interleaved
    /// pairs), YaRN when `rope_scaling` asks for it, as mlx-lm's
    /// `initialize_rope` builds it.
    pub fn rope(&self) -> Result<Rope> {
        Rope::with_yarn(self.qk_rope_head_dim, self.rope_theta, true, self.rope_scaling.as_ref())
    }

    /// The softmax scale: 1/sqrt(qk_nope + qk_rope), times
    /// (0.1 * mscale_all_dim * ln(factor) + 1)² when `rope_scaling` has a
    /// non-zero `mscale_all_dim` and a factor above 1 (mlx-lm's rule).
    pub fn softmax_scale(&self) -> f32 {
        let mut scale = ((self.qk_nope_head_dim + self.qk_rope_head_dim) as f64).powf(-0.5);
        if let Some(s) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            let all_dim = s.get("mscale_all_dim").and_then(Value::as_f64).unwrap_or(0.0);
            let factor = s.get("factor").and_then(Value::as_f64).unwrap_or(1.0);
            if all_dim != 0.0 && factor > 1.0 {
                let m = 0.1 * all_dim * factor.ln() + 1.0;
                scale *= m * m;
            }
        }
        scale as f32
    }

    pub fn mla_dims(&self) -> MlaDims {
        MlaDims {
            heads: self.num_attention_heads,
            q_lora_rank: self.q_lora_rank,
            kv_lora_rank: self.kv_lora_rank,
            qk_nope_head_dim: self.qk_nope_head_dim,
            qk_rope_head_dim: self.qk_rope_head_dim,
            v_head_dim: self.v_head_dim,
            scale: self.softmax_scale(),
        }
    }
}

// ---- block ----

/// Pre-norm block: h = x + mla(norm(x)); out = h + ffn(norm(h)).
pub struct DecoderLayer {
    self_attn: Mla,
    mlp: Box<dyn FeedForward>,
    input_layernorm: Array,          // [D]
    post_attention_layernorm: Array, // [D]
    eps: f32,
}

impl DecoderLayer {
    /// Layer `i` of the stack under `p` (`model.layers.{i}`); `i` picks the
    /// feed-forward (the MTP module's layer is `num_hidden_layers`, a MoE
    /// layer in every DeepSeek-V3 checkpoint).
    pub fn load(w: &mut Weights, c: &Config, i: i32, p: &str) -> Result<Self> {
        let self_attn = Mla::load(w, &format!("{p}.self_attn"), c.mla_dims(), c.rope()?)?;
        let mlp: Box<dyn FeedForward> = if c.is_moe_layer(i) {
            Box::new(DeepseekMoe::load(w, &format!("{p}.mlp"), c.routing()?, c.n_shared_experts.is_some())?)
        } else {
            Box::new(Mlp::load(w, &format!("{p}.mlp"))?)
        };
        Ok(Self {
            self_attn,
            mlp,
            input_layernorm: w.tensor(&format!("{p}.input_layernorm.weight"))?,
            post_attention_layernorm: w.tensor(&format!("{p}.post_attention_layernorm.weight"))?,
            eps: c.rms_norm_eps,
        })
    }

    /// x: [N, D], N = B*L -> [N, D]; `bl` = (B, L).
    pub fn forward(&self, x: &Array, bl: (i32, i32), layer: u32, pos: &Positions, attn: &mut dyn Attend) -> Result<Array> {
        let norms = (&self.input_layernorm, &self.post_attention_layernorm);
        pre_norm_residual(x, norms, self.eps, |n| self.self_attn.forward(n, bl, layer, pos, attn), &*self.mlp)
    }
}

// ---- model ----

pub struct DeepseekV3 {
    config: Config,
    embed_tokens: EmbeddingLayer, // [V, D]
    layers: Vec<DecoderLayer>,
    norm: Array,           // [D]
    lm_head: LinearLayer,  // [D] -> [V]
}

impl DeepseekV3 {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = Config::parse(config_json)?;
        let embed_tokens = w.embedding("model.embed_tokens")?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::load(w, &c, i, &format!("model.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let norm = w.tensor("model.norm.weight")?;
        let lm_head = w.linear("lm_head")?;
        Ok(Self { config: c, embed_tokens, layers, norm, lm_head })
    }
}

impl ModelImpl for DeepseekV3 {
    fn spec(&self) -> ModelSpec {
        model_spec(&self.config, self.config.num_hidden_layers)
    }

    /// tokens: [B, L] -> logits [B, L | 1, V], or hidden states [B, L, D]
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        let pos = Positions::of(attn); // each row's first position
        let bl = (tokens.dim(0), tokens.dim(1));
        let h = rmlx_nn::merge_inputs(self.embed_tokens.lookup(tokens)?, &*attn)?; // [B, L, D]
        let mut h = h.reshape(&[bl.0 * bl.1, -1])?; // [N, D]
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, bl, i as u32, &pos, attn)?;
            offer_hidden_rows(attn, i as u32, &h, bl)?;
        }
        let h = rms_norm(&h, &self.norm, self.config.rms_norm_eps)?; // [N, D]
        finish_rows(h, bl, attn, |h| self.lm_head.forward(h)) // rows [N | B, D] -> [B, L | 1, V]
    }
}

// ---- cache spec ----

/// `num_layers` layers of one KV head of `kv_lora_rank + qk_rope_head_dim`
/// (the latent and the RoPE key; mla.rs), full attention.
pub fn model_spec(c: &Config, num_layers: i32) -> ModelSpec {
    ModelSpec {
        num_layers: num_layers as u32,
        num_kv_heads: 1,
        head_dim: (c.kv_lora_rank + c.qk_rope_head_dim) as u32,
        vocab_size: c.vocab_size as u32,
        hidden_size: c.hidden_size as u32,
        max_context: c.max_position_embeddings.max(0) as u32,
        sliding_window: vec![0; num_layers as usize].into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DeepSeek-V3's own config.json keys (the ones this file reads).
    const V3: &str = r#"{"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
        "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
        "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": true, "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn"}, "num_nextn_predict_layers": 1}"#;

    #[test]
    fn deepseek_v3_config_reads_and_sizes_the_latent_cache() {
        let c = Config::parse(V3).unwrap();
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3) && c.is_moe_layer(60));
        let spec = model_spec(&c, c.num_hidden_layers);
        assert_eq!((spec.num_kv_heads, spec.head_dim), (1, 576));
        // 1/sqrt(192) * (0.1 * ln 40 + 1)^2, as mlx-lm computes it
        let want = (192f64).powf(-0.5) * (0.1 * 40f64.ln() + 1.0).powi(2);
        assert!((c.softmax_scale() as f64 - want).abs() < 1e-7, "{}", c.softmax_scale());
    }

    #[test]
    fn what_is_not_implemented_is_refused_by_name() {
        let with = |k: &str, v: Value| {
            let mut j: Value = serde_json::from_str(V3).unwrap();
            j[k] = v;
            Config::parse(&j.to_string()).err().map(|e| e.message).unwrap_or_default()
        };
        assert!(with("topk_method", "greedy".into()).contains("topk_method `greedy`"));
        assert!(with("scoring_func", "softmax".into()).contains("scoring_func `softmax`"));
        assert!(with("n_group", 7.into()).contains("n_group"));
        assert!(with("topk_group", 9.into()).contains("topk_group"));
        assert!(with("qk_rope_head_dim", 63.into()).contains("qk_rope_head_dim"));
    }
}
