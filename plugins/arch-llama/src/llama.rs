//! model_type `llama` (and `mistral`, which mlx-lm maps onto it).
//! Mirrors mlx_lm/models/llama.py; the layers are plugins/nn's decoder.
//! Shapes: B batch, L new tokens, D hidden, H query heads, K kv heads,
//! hd head_dim, V vocab.
use mlx_rs::Array;
use rmlx_nn::decoder::{model_spec, AttentionSpec, Decoder, Dims};
use rmlx_nn::{parse_config, Rope};
use rmlx_plugin_api::{
    author::{Attend, ModelImpl, Result, Weights},
    ModelSpec, PluginError,
};
use serde::Deserialize;

// ---- config ----

/// The keys mlx-lm's llama `ModelArgs` reads. `attention_bias` and
/// `mlp_bias` need no code here: a linear with a `bias` tensor adds it.
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    pub hidden_size: i32,
    pub num_hidden_layers: i32,
    pub num_attention_heads: i32,
    pub rms_norm_eps: f32,
    pub vocab_size: i32,
    pub head_dim: Option<i32>,
    pub max_position_embeddings: Option<i32>,
    pub num_key_value_heads: Option<i32>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default)]
    pub rope_traditional: bool,
    pub rope_scaling: Option<serde_json::Value>,
    /// mlx-lm's default is tied.
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// Per layer `full_attention` or `sliding_attention` (default all full).
    pub layer_types: Option<Vec<String>>,
    pub sliding_window: Option<u32>,
}

fn default_rope_theta() -> f32 {
    10000.0
}
fn yes() -> bool {
    true
}

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let c: Config = parse_config(json)?;
        c.check()?;
        Ok(c)
    }
    fn kv_heads(&self) -> i32 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    fn head_dim(&self) -> i32 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    /// Layer i's window in tokens (0: full attention).
    fn window(&self, i: i32) -> u32 {
        match &self.layer_types {
            Some(t) if t.get(i as usize).map(String::as_str) == Some("sliding_attention") => {
                self.sliding_window.unwrap_or(0)
            }
            _ => 0,
        }
    }
    /// Refuses, by name, what this file does not implement.
    fn check(&self) -> Result<()> {
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers as usize {
                return Err(PluginError::config(format!(
                    "layer_types has {} entries for {} layers",
                    types.len(),
                    self.num_hidden_layers
                )));
            }
            if let Some(t) = types.iter().find(|t| *t != "full_attention" && *t != "sliding_attention") {
                return Err(PluginError::config(format!("layer_types: unsupported layer type `{t}`")));
            }
            if types.iter().any(|t| t == "sliding_attention") && self.sliding_window.unwrap_or(0) == 0 {
                return Err(PluginError::config("layer_types has sliding_attention but sliding_window is not set"));
            }
        }
        Rope::new(self.head_dim(), self.rope_theta, self.rope_traditional, self.rope_scaling.as_ref())?;
        Ok(())
    }
}

// ---- model ----

pub struct Llama {
    config: Config,
    decoder: Decoder,
}

impl Llama {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = Config::parse(config_json)?;
        let decoder = Decoder::load(w, c.num_hidden_layers, c.rms_norm_eps, c.tie_word_embeddings, |i| {
            Ok(AttentionSpec {
                heads: c.num_attention_heads,
                kv_heads: c.kv_heads(),
                head_dim: c.head_dim(),
                qk_norm: false,
                eps: c.rms_norm_eps,
                window: c.window(i),
                rope: Rope::new(c.head_dim(), c.rope_theta, c.rope_traditional, c.rope_scaling.as_ref())?,
            })
        })?;
        Ok(Self { config: c, decoder })
    }
}

impl ModelImpl for Llama {
    fn spec(&self) -> ModelSpec {
        cache_spec(&self.config)
    }

    /// tokens: [B, L] -> logits [B, L | 1, V]
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        self.decoder.forward(tokens, attn)
    }
}

// ---- cache spec ----

fn cache_spec(c: &Config) -> ModelSpec {
    let dims = Dims {
        num_layers: c.num_hidden_layers,
        kv_heads: c.kv_heads(),
        head_dim: c.head_dim(),
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        max_context: c.max_position_embeddings.unwrap_or(0),
    };
    model_spec(dims, |i| c.window(i))
}
