//! A test plugin (architecture `rmlx_faulty`): a Llama (the same maths as
//! plugins/arch-llama, loading the same weights) whose forward breaks when
//! the batch's input holds config.json's `faulty_trigger` token id.
//! `faulty_mode` picks how, after layer 0 has written its KV:
//! - `bad_kv` (default): layer 1 hands the host's KV store keys and values of
//!   half the head size (an error from inside the host's attention, which
//!   once lost the layer's arrays: they were taken out of the pool first);
//! - `error`: layer 1 returns an error before attending;
//! - `panic`: layer 1 panics (the plugin boundary turns it into an error).
//! Shapes: B batch, L new tokens, D hidden, H heads, K kv heads, hd head dim.
use mlx_rs::{ops::indexing::TryIndexOp, Array};
use rmlx_nn::{finish, merge_heads, parse_config, rms_norm, split_heads, swiglu, Positions, Rope};
use rmlx_plugin_api::{
    author::{Attend, AttendOpts, EmbeddingLayer, LinearLayer, ModelImpl, PluginImpl, Result, Weights},
    export_plugin, Manifest, ModelSpec, PluginError,
};
use serde::Deserialize;

#[derive(Deserialize, Clone)]
struct Config {
    hidden_size: i32,
    num_hidden_layers: i32,
    num_attention_heads: i32,
    num_key_value_heads: i32,
    head_dim: i32,
    rms_norm_eps: f32,
    vocab_size: i32,
    #[serde(default = "theta")]
    rope_theta: f32,
    #[serde(default)]
    tie_word_embeddings: bool,
    max_position_embeddings: Option<i32>,
    faulty_trigger: u32,
    #[serde(default)]
    faulty_mode: String,
}

fn theta() -> f32 {
    10000.0
}

struct Layer {
    q: LinearLayer, // [D] -> [H*hd]
    k: LinearLayer, // [D] -> [K*hd]
    v: LinearLayer, // [D] -> [K*hd]
    o: LinearLayer, // [H*hd] -> [D]
    gate: LinearLayer,
    up: LinearLayer,
    down: LinearLayer,
    ln1: Array, // [D]
    ln2: Array, // [D]
}

struct Faulty {
    c: Config,
    embed: EmbeddingLayer, // [V, D]
    layers: Vec<Layer>,
    norm: Array,                  // [D]
    lm_head: Option<LinearLayer>, // [D] -> [V]
    rope: Rope,
}

struct Plugin;

impl PluginImpl for Plugin {
    fn manifest() -> Manifest {
        Manifest::new("test-faulty", "0.0.1", "Test plugin: a Llama that fails on a trigger token").architectures(&["rmlx_faulty"])
    }
    fn load_model(_t: &str, config: &str, w: &mut Weights<'_, '_>) -> Result<Box<dyn ModelImpl>> {
        let c: Config = parse_config(config)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Layer {
                    q: w.linear(&format!("{p}.self_attn.q_proj"))?,
                    k: w.linear(&format!("{p}.self_attn.k_proj"))?,
                    v: w.linear(&format!("{p}.self_attn.v_proj"))?,
                    o: w.linear(&format!("{p}.self_attn.o_proj"))?,
                    gate: w.linear(&format!("{p}.mlp.gate_proj"))?,
                    up: w.linear(&format!("{p}.mlp.up_proj"))?,
                    down: w.linear(&format!("{p}.mlp.down_proj"))?,
                    ln1: w.tensor(&format!("{p}.input_layernorm.weight"))?,
                    ln2: w.tensor(&format!("{p}.post_attention_layernorm.weight"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if c.tie_word_embeddings || !w.contains("lm_head.weight") { None } else { Some(w.linear("lm_head")?) };
        Ok(Box::new(Faulty {
            embed: w.embedding("model.embed_tokens")?,
            norm: w.tensor("model.norm.weight")?,
            rope: Rope::new(c.head_dim, c.rope_theta, false, None)?,
            layers,
            lm_head,
            c,
        }))
    }
}

impl Faulty {
    /// x: [B, L, D] -> [B, L, D]
    fn block(&self, i: usize, x: &Array, pos: &Positions, attn: &mut dyn Attend, fail: bool) -> Result<Array> {
        let l = &self.layers[i];
        let h = rms_norm(x, &l.ln1, self.c.rms_norm_eps)?;
        let q = self.rope.apply_at(&split_heads(&l.q.forward(&h)?, self.c.num_attention_heads)?, pos)?; // [B, H, L, hd]
        let k = self.rope.apply_at(&split_heads(&l.k.forward(&h)?, self.c.num_key_value_heads)?, pos)?; // [B, K, L, hd]
        let v = split_heads(&l.v.forward(&h)?, self.c.num_key_value_heads)?; // [B, K, L, hd]
        let opts = AttendOpts::plain((self.c.head_dim as f32).powf(-0.5));
        let (k, v) = match (fail, self.c.faulty_mode.as_str()) {
            (true, "panic") => panic!("faulty plugin: trigger token in the batch"),
            (true, "error") => return Err(PluginError::other("faulty plugin: trigger token in the batch")),
            (true, _) => {
                // Keys of half the head size: the host's KV write must refuse them.
                let half = self.c.head_dim / 2;
                (k.try_index((.., .., .., ..half))?, v.try_index((.., .., .., ..half))?)
            }
            (false, _) => (k, v),
        };
        let o = attn.attend(i as u32, q, k, v, &opts)?; // [B, H, L, hd]
        let h = x.add(&l.o.forward(&merge_heads(&o)?)?)?;
        let m = rms_norm(&h, &l.ln2, self.c.rms_norm_eps)?;
        Ok(h.add(&l.down.forward(&swiglu(&l.gate.forward(&m)?, &l.up.forward(&m)?)?)?)?)
    }
}

impl ModelImpl for Faulty {
    fn spec(&self) -> ModelSpec {
        ModelSpec {
            num_layers: self.c.num_hidden_layers as u32,
            num_kv_heads: self.c.num_key_value_heads as u32,
            head_dim: self.c.head_dim as u32,
            vocab_size: self.c.vocab_size as u32,
            hidden_size: self.c.hidden_size as u32,
            max_context: self.c.max_position_embeddings.unwrap_or(0) as u32,
            sliding_window: vec![0u32; self.c.num_hidden_layers as usize].into(),
        }
    }

    /// tokens: [B, L] -> logits [B, L | 1, V]
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        // The test plugin reads its input (a sync the real ones never do).
        tokens.eval()?;
        let fail = tokens.as_dtype(mlx_rs::Dtype::Int32)?.as_slice::<i32>().contains(&(self.c.faulty_trigger as i32));
        let pos = Positions::of(attn);
        let mut h = self.embed.lookup(tokens)?; // [B, L, D]
        for i in 0..self.layers.len() {
            h = self.block(i, &h, &pos, attn, fail && i == 1)?;
        }
        let h = rms_norm(&h, &self.norm, self.c.rms_norm_eps)?;
        finish(h, attn, |h| match &self.lm_head {
            Some(head) => head.forward(h),
            None => self.embed.as_linear(h),
        })
    }
}

export_plugin!(Plugin);
