//! model_type `qwen3`. Mirrors mlx_lm/models/qwen3.py: Llama's layout plus
//! per-head RMSNorm on queries and keys (q_norm, k_norm) before RoPE; the
//! layers are plugins/nn's decoder. Shapes: B batch, L new tokens, D hidden,
//! H query heads, K kv heads, hd head_dim, V vocab.
use mlx_rs::Array;
use rmlx_nn::decoder::{model_spec, AttentionSpec, Decoder, Dims};
use rmlx_nn::{parse_config, Rope};
use rmlx_plugin_api::{
    author::{Attend, ModelImpl, Result, Weights},
    ModelSpec, PluginError,
};
use serde::Deserialize;

// ---- config ----

/// The keys mlx-lm's qwen3 `ModelArgs` reads.
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    pub hidden_size: i32,
    pub num_hidden_layers: i32,
    pub num_attention_heads: i32,
    pub rms_norm_eps: f32,
    pub vocab_size: i32,
    pub head_dim: i32,
    pub max_position_embeddings: i32,
    pub num_key_value_heads: i32,
    pub rope_theta: Option<f32>,
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 nests rope_theta and rope_scaling here.
    pub rope_parameters: Option<serde_json::Value>,
    pub tie_word_embeddings: bool,
}

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let mut c: Config = parse_config(json)?;
        if let Some(p) = c.rope_parameters.clone().filter(|p| !p.is_null()) {
            if c.rope_theta.is_none() {
                c.rope_theta = p.get("rope_theta").and_then(|v| v.as_f64()).map(|v| v as f32);
            }
            if c.rope_scaling.is_none() {
                c.rope_scaling = Some(p);
            }
        }
        if c.rope_theta.is_none() {
            return Err(PluginError::config("rope_theta is missing from the model config"));
        }
        c.rope()?;
        Ok(c)
    }
    fn rope(&self) -> Result<Rope> {
        Rope::new(self.head_dim, self.rope_theta.unwrap_or(10000.0), false, self.rope_scaling.as_ref())
    }
}

// ---- model ----

pub struct Qwen3 {
    config: Config,
    decoder: Decoder,
}

impl Qwen3 {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = Config::parse(config_json)?;
        let decoder = Decoder::load(w, c.num_hidden_layers, c.rms_norm_eps, c.tie_word_embeddings, |_| {
            Ok(AttentionSpec {
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                qk_norm: true,
                eps: c.rms_norm_eps,
                window: 0,
                rope: c.rope()?,
            })
        })?;
        Ok(Self { config: c, decoder })
    }
}

impl ModelImpl for Qwen3 {
    fn spec(&self) -> ModelSpec {
        let c = &self.config;
        let dims = Dims {
            num_layers: c.num_hidden_layers,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            max_context: c.max_position_embeddings,
        };
        model_spec(dims, |_| 0)
    }

    /// tokens: [B, L] -> logits [B, L | 1, V]
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        self.decoder.forward(tokens, attn)
    }
}
