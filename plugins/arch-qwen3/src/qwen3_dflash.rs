//! model_type `qwen3_dflash`: the DFlash block-diffusion drafter (arXiv
//! 2602.06036) that z-lab ships as sidecar checkpoints of `model_type`
//! `qwen3`, as a drafter head (plugin ABI 3.6, `Model::conditioning`).
//! Mirrors mlx-vlm's `DFlashDraftModel` (mlx_vlm/speculative/drafters/
//! qwen3_dflash):
//!
//!   c   = hidden_norm(fc(h))        h: the verifier's hidden states of the
//!                                   `target_layer_ids`, concatenated [.., nD]
//!   x   = embed(block)              block = [bonus, mask, mask, ...]
//!   per layer:
//!     n = input_layernorm(x)
//!     q = q_norm(q_proj(n))                      block rows only
//!     k, v = k_proj / v_proj of c (context rows, no input norm)
//!            and of n (block rows); k_norm on both; RoPE at each row's
//!            position (context first, the block after it)
//!     x = x + o_proj(attend(q, k, v))            NOT causal: every block row
//!                                                sees the whole context and
//!                                                the whole block
//!     x = x + mlp(post_attention_layernorm(x))
//!   logits = lm_head(norm(x))      the verifier's head; rows 1.. propose
//!                                  the block's masked tokens at once
//!
//! How the host lends it (one forward per draft round): `tokens` [B, S + L]
//! and `input_embeddings()` = (features [B, S + L, nD], mask [B, S + L]):
//! rows whose mask is set are **context** (the verifier's hidden states of
//! tokens the drafter has not seen yet; their token ids are not read), the
//! others the **block**. Every row is at its own position (the head's cached
//! positions, then these rows in order). Context rows run through the layers
//! too, only so one forward needs no host-side split: each layer's K/V of a
//! context row comes from `c`, never from the row's own stream, so what those
//! rows compute is never read by a block row. The host keeps the context
//! rows' K/V (the drafter's cache holds the context only) and drops the
//! block's. `config.json`'s `dflash_config.causal` (mlx-vlm's `is_causal`)
//! makes the attention causal instead.
//!
//! Weights: the sidecar's own tensors (`fc`, `hidden_norm`, `layers.{i}`,
//! `norm`, with or without a `model.` prefix) and the verifier's embedding
//! and LM head (tied to the embedding when there is no `lm_head`): the
//! host's `WeightSource` answers for both directories. Settings this port
//! does not implement (sliding-window layers, `draft_window_size`,
//! attention-sink bias) are refused by name.
//!
//! Shapes: B batch, T = S + L rows (context + block), D hidden, n target
//! layers, H query heads, K kv heads, hd head_dim, V vocab.
use mlx_rs::{ops, Array};
use rmlx_nn::decoder::{model_spec, Dims, Mlp};
use rmlx_nn::{merge_heads, parse_config, require_grouped_heads, require_positive, rms_norm, split_heads, Positions, Rope};
use rmlx_plugin_api::{
    author::{Attend, AttendOpts, EmbeddingLayer, LinearLayer, Linears, ModelImpl, Output, Result, Weights},
    ModelSpec, PluginError,
};
use serde::Deserialize;
use serde_json::Value;

// ---- config ----

/// The keys mlx-vlm's `DFlashConfig` reads (and the ones it would use that
/// this port refuses).
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    pub hidden_size: i32,
    pub num_hidden_layers: i32,
    pub num_attention_heads: i32,
    pub num_key_value_heads: i32,
    pub head_dim: Option<i32>,
    pub rms_norm_eps: f32,
    pub vocab_size: i32,
    #[serde(default)]
    pub max_position_embeddings: i32,
    pub rope_theta: Option<f32>,
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub layer_types: Vec<String>,
    pub final_logit_softcapping: Option<f32>,
    pub dflash_config: Option<Value>,
    /// Top-level fallbacks of `dflash_config`'s keys.
    pub target_layer_ids: Option<Vec<i32>>,
    pub draft_window_size: Option<i64>,
    #[serde(default)]
    pub attention_sink_bias: bool,
}

/// What the drafter reads from its config, checked.
pub struct Settings {
    pub config: Config,
    pub head_dim: i32,
    pub target_layers: Vec<i32>,
    pub causal: bool,
    pub rope: Rope,
}

impl Settings {
    pub fn parse(json: &str) -> Result<Self> {
        let mut c: Config = parse_config(json)?;
        let dflash = c.dflash_config.clone().filter(|v| v.is_object()).unwrap_or(Value::Null);
        let target_layers: Vec<i32> = match dflash.get("target_layer_ids") {
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| PluginError::config(format!("dflash_config.target_layer_ids: {e}")))?,
            None => c.target_layer_ids.clone().unwrap_or_default(),
        };
        if target_layers.is_empty() {
            return Err(PluginError::config(
                "a DFlash drafter names the verifier layers it reads in dflash_config.target_layer_ids; this config has none",
            ));
        }
        if target_layers.iter().any(|&l| l < 0) {
            return Err(PluginError::config(format!("dflash_config.target_layer_ids must be layer indices >= 0, got {target_layers:?}")));
        }
        let causal = dflash.get("causal").and_then(Value::as_bool).unwrap_or(false);
        let window = dflash.get("draft_window_size").and_then(Value::as_i64).or(c.draft_window_size);
        if window.is_some_and(|w| w > 0) {
            return Err(PluginError::unsupported("this DFlash drafter keeps a window of its context (draft_window_size): not implemented yet"));
        }
        if c.attention_sink_bias || dflash.get("attention_sink_bias").and_then(Value::as_bool).unwrap_or(false) {
            return Err(PluginError::unsupported("DFlash drafters with attention-sink bias are not implemented yet"));
        }
        if let Some(t) = c.layer_types.iter().find(|t| t.as_str() != "full_attention") {
            return Err(PluginError::unsupported(format!("DFlash drafter layers of type `{t}` are not implemented (full_attention only)")));
        }
        require_positive(&[
            ("hidden_size", c.hidden_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("num_key_value_heads", c.num_key_value_heads),
            ("vocab_size", c.vocab_size),
        ])?;
        require_grouped_heads(c.num_attention_heads, c.num_key_value_heads)?;
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
        require_positive(&[("head_dim", head_dim)])?;
        if let Some(p) = c.rope_parameters.clone().filter(|p| p.is_object()) {
            if c.rope_theta.is_none() {
                c.rope_theta = p.get("rope_theta").and_then(Value::as_f64).map(|v| v as f32);
            }
            if c.rope_scaling.is_none() {
                c.rope_scaling = Some(p);
            }
        }
        // DFlashConfig's default rope_theta.
        let rope = Rope::new(head_dim, c.rope_theta.unwrap_or(10_000_000.0), false, c.rope_scaling.as_ref())?;
        Ok(Self { config: c, head_dim, target_layers, causal, rope })
    }
}

pub fn check(config_json: &str) -> Result<()> {
    Settings::parse(config_json).map(|_| ())
}

// ---- attention ----

/// One layer's attention: queries from the block's stream, keys and values
/// from the context (`c`) on context rows and from the stream on the block's.
struct DFlashAttention {
    q_proj: LinearLayer, // [D] -> [H*hd]
    kv: Linears,         // k_proj, v_proj: [D] -> [K*hd] each
    o_proj: LinearLayer, // [H*hd] -> [D]
    q_norm: Array,       // [hd]
    k_norm: Array,       // [hd]
}

impl DFlashAttention {
    fn load(w: &mut Weights, p: &str) -> Result<Self> {
        Ok(Self {
            q_proj: w.linear(&format!("{p}.q_proj"))?,
            kv: w.linears(&[&format!("{p}.k_proj"), &format!("{p}.v_proj")])?,
            o_proj: w.linear(&format!("{p}.o_proj"))?,
            q_norm: w.tensor(&format!("{p}.q_norm.weight"))?,
            k_norm: w.tensor(&format!("{p}.k_norm.weight"))?,
        })
    }

    /// n: the normed stream [B, T, D]; c: the context [B, T, D]; is_ctx
    /// bool [B, T, 1] -> [B, T, D]
    #[allow(clippy::too_many_arguments)]
    fn forward(&self, n: &Array, c: &Array, is_ctx: &Array, layer: u32, pos: &Positions, s: &Settings, attn: &mut dyn Attend) -> Result<Array> {
        let cfg = &s.config;
        let eps = cfg.rms_norm_eps;
        let kv_in = ops::select(is_ctx, c, n)?; // [B, T, D]
        let [k, v]: [Array; 2] = self.kv.forward(&kv_in)?.try_into().map_err(|_| PluginError::other("k/v: two outputs expected"))?;
        let q = split_heads(&self.q_proj.forward(n)?, cfg.num_attention_heads)?; // [B, H, T, hd]
        let k = split_heads(&k, cfg.num_key_value_heads)?; // [B, K, T, hd]
        let v = split_heads(&v, cfg.num_key_value_heads)?; // [B, K, T, hd]
        let q = s.rope.apply_at(&rms_norm(&q, &self.q_norm, eps)?, pos)?;
        let k = s.rope.apply_at(&rms_norm(&k, &self.k_norm, eps)?, pos)?;
        let mut opts = AttendOpts::plain((s.head_dim as f32).powf(-0.5));
        if !s.causal {
            opts = opts.bidirectional();
        }
        let o = attn.attend(layer, q, k, v, &opts)?; // [B, H, T, hd]
        self.o_proj.forward(&merge_heads(&o)?)
    }
}

struct Layer {
    self_attn: DFlashAttention,
    mlp: Mlp,
    input_layernorm: Array,          // [D]
    post_attention_layernorm: Array, // [D]
}

// ---- model ----

pub struct Qwen3DFlash {
    s: Settings,
    embed_tokens: EmbeddingLayer, // [V, D], the verifier's
    fc: LinearLayer,              // [nD] -> [D]
    hidden_norm: Array,           // [D]
    layers: Vec<Layer>,
    norm: Array,                  // [D]
    lm_head: Option<LinearLayer>, // [D] -> [V], the verifier's; None when tied
}

/// The first of `names` the weights hold.
fn first_of<'n>(w: &Weights, names: &[&'n str], what: &str) -> Result<&'n str> {
    names.iter().copied().find(|n| w.contains(&format!("{n}.weight"))).ok_or_else(|| {
        PluginError::config(format!(
            "the DFlash drafter needs the verifier's {what} (one of {names:?}); load it with the verifier's directory beside its own"
        ))
    })
}

impl Qwen3DFlash {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let s = Settings::parse(config_json)?;
        let p = ["", "model."].into_iter().find(|p| w.contains(&format!("{p}fc.weight"))).ok_or_else(|| {
            PluginError::config("this is not a DFlash drafter checkpoint: no `fc.weight` (the projection of the verifier's hidden states)")
        })?;
        // The drafter's own embedding if it ships one (mlx-vlm keeps it), else the verifier's.
        let embed = first_of(
            w,
            &["embed_tokens", "model.embed_tokens", "model.language_model.embed_tokens", "language_model.model.embed_tokens"],
            "token embedding",
        )?;
        let embed_tokens = w.embedding(embed)?;
        let head = ["lm_head", "language_model.lm_head"].into_iter().find(|h| w.contains(&format!("{h}.weight")));
        let lm_head = head.map(|h| w.linear(h)).transpose()?;
        let fc = w.linear(&format!("{p}fc"))?;
        let hidden_norm = w.tensor(&format!("{p}hidden_norm.weight"))?;
        let layers = (0..s.config.num_hidden_layers)
            .map(|i| {
                let lp = format!("{p}layers.{i}");
                Ok(Layer {
                    self_attn: DFlashAttention::load(w, &format!("{lp}.self_attn"))?,
                    mlp: Mlp::load(w, &format!("{lp}.mlp"))?,
                    input_layernorm: w.tensor(&format!("{lp}.input_layernorm.weight"))?,
                    post_attention_layernorm: w.tensor(&format!("{lp}.post_attention_layernorm.weight"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = w.tensor(&format!("{p}norm.weight"))?;
        Ok(Self { s, embed_tokens, fc, hidden_norm, layers, norm, lm_head })
    }

    fn logits(&self, h: &Array) -> Result<Array> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(h)?,
            None => self.embed_tokens.as_linear(h)?,
        }; // [B, T, V]
        match self.s.config.final_logit_softcapping.filter(|&c| c > 0.0) {
            None => Ok(logits),
            Some(cap) => {
                let c = Array::from_f32(cap).as_dtype(logits.dtype())?;
                Ok(ops::tanh(&logits.divide(&c)?)?.multiply(&c)?)
            }
        }
    }
}

impl ModelImpl for Qwen3DFlash {
    // ---- cache spec ----
    fn spec(&self) -> ModelSpec {
        let c = &self.s.config;
        let dims = Dims {
            num_layers: c.num_hidden_layers,
            kv_heads: c.num_key_value_heads,
            head_dim: self.s.head_dim,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            max_context: c.max_position_embeddings.max(0),
        };
        model_spec(dims, |_| 0)
    }

    /// The verifier layers of `dflash_config.target_layer_ids`.
    fn conditioning(&self) -> Vec<i32> {
        self.s.target_layers.clone()
    }

    /// tokens [B, T]; input_embeddings: (the verifier's hidden states
    /// [B, T, nD] on context rows, mask bool [B, T]: set on context rows)
    /// -> logits [B, T | 1, V] (or the normed states [B, T, D]).
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        let c = &self.s.config;
        let eps = c.rms_norm_eps;
        let (feats, mask) = attn.input_embeddings().ok_or_else(|| {
            PluginError::config("the DFlash drafter needs its context (the verifier's hidden states) as input embeddings")
        })?;
        let (b, t) = (tokens.dim(0), tokens.dim(1));
        let n_in = self.s.target_layers.len() as i32 * c.hidden_size;
        if feats.shape() != [b, t, n_in] || mask.shape() != [b, t] {
            return Err(PluginError::config(format!(
                "the DFlash drafter's context is {:?} with mask {:?}, expected [{b}, {t}, {n_in}] and [{b}, {t}] ({} target layers of {})",
                feats.shape(),
                mask.shape(),
                self.s.target_layers.len(),
                c.hidden_size
            )));
        }
        let pos = Positions::of(attn);
        let e = self.embed_tokens.lookup(tokens)?; // [B, T, D]
        let ctx = rms_norm(&self.fc.forward(&feats.as_dtype(e.dtype())?)?, &self.hidden_norm, eps)?; // [B, T, D]
        let is_ctx = mask.expand_dims(-1)?; // [B, T, 1]
        let mut x = ops::select(&is_ctx, &ctx, &e)?; // [B, T, D]
        for (i, l) in self.layers.iter().enumerate() {
            let n = rms_norm(&x, &l.input_layernorm, eps)?;
            let r = l.self_attn.forward(&n, &ctx, &is_ctx, i as u32, &pos, &self.s, attn)?;
            let h = x.add(&r)?;
            x = h.add(&l.mlp.forward(&rms_norm(&h, &l.post_attention_layernorm, eps)?)?)?;
        }
        let h = rms_norm(&x, &self.norm, eps)?; // [B, T, D]
        match attn.output() {
            Output::Hidden => Ok(h),
            Output::AllLogits => self.logits(&h),
            Output::LastLogits => self.logits(&rmlx_nn::last_position(&h)?),
            Output::Media => Err(PluginError::unsupported("the DFlash drafter has no media encoder")),
        }
    }
}
