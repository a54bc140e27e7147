//! model_type `qwen2` (Qwen2, Qwen2.5). Mirrors mlx_lm/models/qwen2.py:
//! Llama's layout with biases on the q/k/v projections (the WeightQuant
//! plugin adds a linear's `bias` when the checkpoint has one) and head_dim =
//! hidden / heads; the layers are plugins/nn's decoder. Shapes: B batch,
//! L new tokens, D hidden, H query heads, K kv heads, hd head_dim, V vocab.
use mlx_rs::Array;
use rmlx_nn::decoder::{model_spec, AttentionSpec, Decoder, Dims};
use rmlx_nn::{parse_config, Rope};
use rmlx_plugin_api::{
    author::{Attend, ModelImpl, Result, Weights},
    ModelSpec, PluginError,
};
use serde::Deserialize;

// ---- config ----

/// The keys mlx-lm's qwen2 `ModelArgs` reads, with its defaults.
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    pub hidden_size: i32,
    pub num_hidden_layers: i32,
    pub num_attention_heads: i32,
    pub rms_norm_eps: f32,
    pub vocab_size: i32,
    pub num_key_value_heads: i32,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: i32,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default)]
    pub rope_traditional: bool,
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
}

fn default_max_positions() -> i32 {
    32768
}
fn default_rope_theta() -> f32 {
    1_000_000.0
}
fn yes() -> bool {
    true
}

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let c: Config = parse_config(json)?;
        if c.num_attention_heads <= 0 || c.hidden_size % c.num_attention_heads != 0 {
            return Err(PluginError::config(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        c.rope()?;
        Ok(c)
    }
    fn head_dim(&self) -> i32 {
        self.hidden_size / self.num_attention_heads
    }
    fn rope(&self) -> Result<Rope> {
        Rope::new(self.head_dim(), self.rope_theta, self.rope_traditional, self.rope_scaling.as_ref())
    }
}

// ---- model ----

pub struct Qwen2 {
    config: Config,
    decoder: Decoder,
}

impl Qwen2 {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = Config::parse(config_json)?;
        let decoder = Decoder::load(w, c.num_hidden_layers, c.rms_norm_eps, c.tie_word_embeddings, |_| {
            Ok(AttentionSpec {
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim(),
                qk_norm: false,
                eps: c.rms_norm_eps,
                window: 0,
                rope: c.rope()?,
            })
        })?;
        Ok(Self { config: c, decoder })
    }
}

impl ModelImpl for Qwen2 {
    fn spec(&self) -> ModelSpec {
        let c = &self.config;
        let dims = Dims {
            num_layers: c.num_hidden_layers,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim(),
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
