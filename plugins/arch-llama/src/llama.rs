//! model_type `llama` (and `mistral`, which mlx-lm maps onto it).
//! Mirrors mlx_lm/models/llama.py. Shapes: B batch, L new tokens, D hidden,
//! H query heads, K kv heads, hd head_dim, F intermediate, V vocab.
use mlx_rs::Array;
use rmlx_nn::{Positions, last_position, merge_heads, parse_config, rms_norm, split_heads, swiglu, Rope};
use rmlx_plugin_api::{
    author::{EmbeddingLayer, LinearLayer, ModelImpl, Result, Weights},
    AttendOptions, Attention, ModelSpec,
};
use serde::Deserialize;

// ---- config ----

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
}

fn default_rope_theta() -> f32 {
    10000.0
}
fn yes() -> bool {
    true
}

impl Config {
    fn kv_heads(&self) -> i32 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    fn head_dim(&self) -> i32 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

// ---- attention ----

pub struct SelfAttention {
    q_proj: LinearLayer, // [D] -> [H*hd]
    k_proj: LinearLayer, // [D] -> [K*hd]
    v_proj: LinearLayer, // [D] -> [K*hd]
    o_proj: LinearLayer, // [H*hd] -> [D]
    heads: i32,
    kv_heads: i32,
    scale: f32,
    rope: Rope,
}

impl SelfAttention {
    fn load(w: &mut Weights, p: &str, c: &Config) -> Result<Self> {
        let hd = c.head_dim();
        Ok(Self {
            q_proj: w.linear(&format!("{p}.q_proj"))?,
            k_proj: w.linear(&format!("{p}.k_proj"))?,
            v_proj: w.linear(&format!("{p}.v_proj"))?,
            o_proj: w.linear(&format!("{p}.o_proj"))?,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            scale: (hd as f32).powf(-0.5),
            rope: Rope::new(hd, c.rope_theta, c.rope_traditional, c.rope_scaling.as_ref())?,
        })
    }

    /// x: [B, L, D] -> [B, L, D]
    fn forward(&self, x: &Array, layer: u32, pos: &Positions, attn: &mut Attention) -> Result<Array> {
        let q = split_heads(&self.q_proj.forward(x)?, self.heads)?; // [B, H, L, hd]
        let k = split_heads(&self.k_proj.forward(x)?, self.kv_heads)?; // [B, K, L, hd]
        let v = split_heads(&self.v_proj.forward(x)?, self.kv_heads)?; // [B, K, L, hd]
        let q = self.rope.apply_at(&q, pos)?;
        let k = self.rope.apply_at(&k, pos)?;
        let o = attn.attend_arrays(layer, q, k, v, AttendOptions { scale: self.scale, window: 0 })?; // [B, H, L, hd]
        self.o_proj.forward(&merge_heads(&o)?)
    }
}

// ---- MLP ----

pub struct Mlp {
    gate_proj: LinearLayer, // [D] -> [F]
    up_proj: LinearLayer,   // [D] -> [F]
    down_proj: LinearLayer, // [F] -> [D]
}

impl Mlp {
    fn load(w: &mut Weights, p: &str) -> Result<Self> {
        Ok(Self {
            gate_proj: w.linear(&format!("{p}.gate_proj"))?,
            up_proj: w.linear(&format!("{p}.up_proj"))?,
            down_proj: w.linear(&format!("{p}.down_proj"))?,
        })
    }

    /// x: [B, L, D] -> [B, L, D]
    fn forward(&self, x: &Array) -> Result<Array> {
        self.down_proj.forward(&swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?)
    }
}

// ---- block ----

pub struct Block {
    self_attn: SelfAttention,
    mlp: Mlp,
    input_layernorm: Array,          // [D]
    post_attention_layernorm: Array, // [D]
    eps: f32,
}

impl Block {
    fn load(w: &mut Weights, p: &str, c: &Config) -> Result<Self> {
        Ok(Self {
            self_attn: SelfAttention::load(w, &format!("{p}.self_attn"), c)?,
            mlp: Mlp::load(w, &format!("{p}.mlp"))?,
            input_layernorm: w.tensor(&format!("{p}.input_layernorm.weight"))?,
            post_attention_layernorm: w.tensor(&format!("{p}.post_attention_layernorm.weight"))?,
            eps: c.rms_norm_eps,
        })
    }

    /// x: [B, L, D] -> [B, L, D]
    fn forward(&self, x: &Array, layer: u32, pos: &Positions, attn: &mut Attention) -> Result<Array> {
        let r = self.self_attn.forward(&rms_norm(x, &self.input_layernorm, self.eps)?, layer, pos, attn)?;
        let h = x.add(&r)?;
        let r = self.mlp.forward(&rms_norm(&h, &self.post_attention_layernorm, self.eps)?)?;
        Ok(h.add(&r)?)
    }
}

// ---- model ----

pub struct Llama {
    config: Config,
    embed_tokens: EmbeddingLayer, // [V, D]
    layers: Vec<Block>,
    norm: Array,                   // [D]
    lm_head: Option<LinearLayer>,  // [D] -> [V]; None when tied
}

impl Llama {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let config: Config = parse_config(config_json)?;
        let embed_tokens = w.embedding("model.embed_tokens")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Block::load(w, &format!("model.layers.{i}"), &config))
            .collect::<Result<Vec<_>>>()?;
        let norm = w.tensor("model.norm.weight")?;
        let lm_head = if tied(&config, w) { None } else { Some(w.linear("lm_head")?) };
        Ok(Self { config, embed_tokens, layers, norm, lm_head })
    }
}

impl ModelImpl for Llama {
    fn spec(&self) -> ModelSpec {
        cache_spec(&self.config)
    }

    /// tokens: [B, L] -> logits [B, L | 1, V]
    fn forward(&mut self, tokens: &Array, attn: &mut Attention, last_only: bool) -> Result<Array> {
        let pos = Positions::of(attn); // each row's first position
        let mut h = self.embed_tokens.lookup(tokens)?; // [B, L, D]
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, i as u32, &pos, attn)?;
        }
        let mut h = rms_norm(&h, &self.norm, self.config.rms_norm_eps)?;
        if last_only {
            h = last_position(&h)?;
        }
        match &self.lm_head {
            Some(head) => head.forward(&h),
            None => self.embed_tokens.as_linear(&h),
        }
    }
}

// ---- weight sanitising ----

/// mlx-lm drops `lm_head` when embeddings are tied and ignores rotary
/// `inv_freq` buffers; here the model simply never asks for them. A checkpoint
/// that says untied but has no `lm_head` is treated as tied, like HF does.
fn tied(c: &Config, w: &Weights) -> bool {
    c.tie_word_embeddings || !w.contains("lm_head.weight")
}

// ---- cache spec ----

fn cache_spec(c: &Config) -> ModelSpec {
    ModelSpec {
        num_layers: c.num_hidden_layers as u32,
        num_kv_heads: c.kv_heads() as u32,
        head_dim: c.head_dim() as u32,
        vocab_size: c.vocab_size as u32,
        hidden_size: c.hidden_size as u32,
        max_context: c.max_position_embeddings.unwrap_or(0) as u32,
        sliding_window: vec![0u32; c.num_hidden_layers as usize].into(),
    }
}
