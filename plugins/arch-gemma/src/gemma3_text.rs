//! model_type `gemma3_text` (Gemma 3 text decoders, e.g. Gemma-3-270M).
//! Mirrors mlx_lm/models/gemma3_text.py:
//! - RMSNorm everywhere with the `1 + weight` convention (nn::gemma::GemmaNorm),
//!   including the per-head q/k norms before RoPE;
//! - embeddings scaled by sqrt(hidden) rounded to bfloat16;
//! - local (sliding-window) and global layers: layer i is global when
//!   i % sliding_window_pattern == pattern - 1; local layers use RoPE base
//!   `rope_local_base_freq`, global ones `rope_theta` and `rope_scaling`;
//! - attention scale query_pre_attn_scalar^-0.5;
//! - the gated tanh-GELU MLP; norms before and after both attention and MLP;
//! - the output head tied to the embedding unless `lm_head` is in the
//!   checkpoint (mlx-lm's `sanitize`; config's `tie_word_embeddings` is not read).
//!
//! The residual stream runs as rows [N, D], N = B*L, from the embedding
//! scale to the final norm, so every linear gets a 2-D input (MLX's matmul
//! adds a Flatten and an Unflatten for a [B, L, D] one; the same product
//! otherwise); [B, L, ...] only for the heads, the host's hidden states,
//! the merge of input features and the logits.
//!
//! Shapes: B batch, L new tokens, N = B*L rows, D hidden, H query heads,
//! K kv heads, hd head_dim, V vocab.
use mlx_rs::Array;
use rmlx_nn::decoder::{model_spec, Dims};
use rmlx_nn::gemma::{clip_residual, scale_embeddings, GeluMlp, GemmaNorm};
use rmlx_nn::{
    finish_rows, merge_heads_to_rows, merge_inputs, offer_hidden_rows, parse_config, require_grouped_heads, require_positive,
    split_heads_of, Positions, Rope,
};
use rmlx_plugin_api::{
    author::{Attend, AttendOpts, EmbeddingLayer, LinearLayer, ModelImpl, Output, Result, Weights},
    ModelSpec, PluginError,
};
use serde::Deserialize;
use serde_json::Value;

// ---- config ----

/// The keys mlx-lm's gemma3_text `ModelArgs` reads, with its defaults, plus
/// keys it ignores that would change the computation if honoured (checked so
/// a config that needs them is refused by name rather than run wrongly).
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    #[serde(default = "d_hidden")]
    pub hidden_size: i32,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: i32,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: i32,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i32,
    #[serde(default = "d_head_dim")]
    pub head_dim: i32,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "d_vocab")]
    pub vocab_size: i32,
    #[serde(default = "d_kv_heads")]
    pub num_key_value_heads: i32,
    #[serde(default = "d_rope_theta")]
    pub rope_theta: f32,
    #[serde(default = "d_rope_local")]
    pub rope_local_base_freq: f32,
    #[serde(default = "d_qpas")]
    pub query_pre_attn_scalar: f64,
    #[serde(default = "d_window")]
    pub sliding_window: i64,
    #[serde(default = "d_pattern")]
    pub sliding_window_pattern: i64,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: i32,
    pub rope_scaling: Option<Value>,
    // Not read by mlx-lm; checked against what it does.
    /// HF's per-layer `sliding_attention` / `full_attention`: must agree
    /// with `sliding_window_pattern`, which is what mlx-lm follows.
    pub layer_types: Option<Vec<String>>,
    pub hidden_activation: Option<String>,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub use_bidirectional_attention: bool,
    /// transformers >= 5: per layer type `{rope_type, rope_theta, ...}`.
    pub rope_parameters: Option<Value>,
}

fn d_hidden() -> i32 {
    1152
}
fn d_layers() -> i32 {
    26
}
fn d_intermediate() -> i32 {
    6912
}
fn d_heads() -> i32 {
    4
}
fn d_head_dim() -> i32 {
    256
}
fn d_eps() -> f32 {
    1.0e-6
}
fn d_vocab() -> i32 {
    262144
}
fn d_kv_heads() -> i32 {
    1
}
fn d_rope_theta() -> f32 {
    1_000_000.0
}
fn d_rope_local() -> f32 {
    10_000.0
}
fn d_qpas() -> f64 {
    256.0
}
fn d_window() -> i64 {
    512
}
fn d_pattern() -> i64 {
    6
}
fn d_max_pos() -> i32 {
    32768
}

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let c: Config = parse_config(json)?;
        c.check()?;
        Ok(c)
    }

    /// Layer i attends globally (full attention) rather than in the window.
    fn is_global(&self, i: i32) -> bool {
        let p = self.sliding_window_pattern;
        i as i64 % p == p - 1
    }

    /// Layer i's window in tokens (0: full attention).
    fn window(&self, i: i32) -> u32 {
        if self.is_global(i) {
            0
        } else {
            self.sliding_window as u32
        }
    }

    /// Layer i's RoPE: local layers use `rope_local_base_freq` and no
    /// scaling; global layers `rope_theta` and `rope_scaling`.
    fn rope(&self, i: i32) -> Result<Rope> {
        if self.is_global(i) {
            Rope::new(self.head_dim, self.rope_theta, false, self.rope_scaling.as_ref())
        } else {
            Rope::new(self.head_dim, self.rope_local_base_freq, false, None)
        }
    }

    /// Refuses, by name, what this file does not implement.
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(m));
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        require_positive(&positive)?;
        require_grouped_heads(self.num_attention_heads, self.num_key_value_heads)?;
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.sliding_window_pattern < 1 {
            return bad(format!("sliding_window_pattern must be at least 1, got {}", self.sliding_window_pattern));
        }
        let has_local = (0..self.num_hidden_layers).any(|i| !self.is_global(i));
        if has_local && !(1..=u32::MAX as i64).contains(&self.sliding_window) {
            return bad(format!("sliding_window must be a positive token count, got {}", self.sliding_window));
        }
        // NaN is refused too.
        if self.query_pre_attn_scalar.is_nan() || self.query_pre_attn_scalar <= 0.0 {
            return bad(format!("query_pre_attn_scalar must be positive, got {}", self.query_pre_attn_scalar));
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers as usize {
                return bad(format!("layer_types has {} entries for {} layers", types.len(), self.num_hidden_layers));
            }
            for (i, t) in types.iter().enumerate() {
                let want = if self.is_global(i as i32) { "full_attention" } else { "sliding_attention" };
                if t != want {
                    return bad(format!(
                        "layer_types[{i}] is `{t}` but sliding_window_pattern {} makes layer {i} {want} \
                         (mlx-lm follows the pattern; other layouts are not supported)",
                        self.sliding_window_pattern
                    ));
                }
            }
        }
        if let Some(a) = self.hidden_activation.as_deref().filter(|a| *a != "gelu_pytorch_tanh") {
            return bad(format!("hidden_activation `{a}` is not supported (gemma3_text uses gelu_pytorch_tanh)"));
        }
        if let Some(v) = self.final_logit_softcapping {
            return bad(format!("final_logit_softcapping {v} is not supported for gemma3_text (mlx-lm applies none)"));
        }
        if let Some(v) = self.attn_logit_softcapping {
            return bad(format!("attn_logit_softcapping {v} is not supported for gemma3_text (mlx-lm applies none)"));
        }
        if self.use_bidirectional_attention {
            return bad("use_bidirectional_attention is not supported (causal decoders only)".into());
        }
        if let Some(p) = self.rope_parameters.as_ref().filter(|p| !p.is_null()) {
            self.check_rope_parameters(p)?;
        }
        // Builds both RoPEs: an unsupported rope_scaling type is refused here.
        for i in 0..self.num_hidden_layers.min(self.sliding_window_pattern as i32) {
            self.rope(i)?;
        }
        Ok(())
    }

    /// transformers >= 5 nests RoPE settings per layer type; mlx-lm reads
    /// only the flat keys, so the nested ones must say the same thing.
    fn check_rope_parameters(&self, p: &Value) -> Result<()> {
        for (kind, base, scaled) in [
            ("full_attention", self.rope_theta, self.rope_scaling.as_ref().filter(|s| !s.is_null())),
            ("sliding_attention", self.rope_local_base_freq, None),
        ] {
            let Some(e) = p.get(kind) else { continue };
            if let Some(t) = e.get("rope_theta").and_then(Value::as_f64) {
                if t as f32 != base {
                    return Err(PluginError::config(format!(
                        "rope_parameters.{kind}.rope_theta {t} differs from the flat key ({base}) mlx-lm reads"
                    )));
                }
            }
            let ty = e.get("rope_type").and_then(Value::as_str).unwrap_or("default");
            if ty != "default" && scaled.is_none() {
                return Err(PluginError::config(format!(
                    "rope_parameters.{kind}.rope_type `{ty}` is not supported without a matching rope_scaling"
                )));
            }
        }
        Ok(())
    }
}

// ---- attention ----

pub struct GemmaAttention {
    q_proj: LinearLayer, // [D] -> [H*hd]
    k_proj: LinearLayer, // [D] -> [K*hd]
    v_proj: LinearLayer, // [D] -> [K*hd]
    o_proj: LinearLayer, // [H*hd] -> [D]
    q_norm: GemmaNorm,   // [hd]
    k_norm: GemmaNorm,   // [hd]
    heads: i32,
    kv_heads: i32,
    rope: Rope,
    /// Softmax scale and window (0: full) of `AttendOpts`.
    scale: f32,
    window: u32,
}

impl GemmaAttention {
    fn load(w: &mut Weights, p: &str, c: &Config, i: i32) -> Result<Self> {
        let scale = c.query_pre_attn_scalar.powf(-0.5) as f32;
        Ok(Self {
            q_proj: w.linear(&format!("{p}.q_proj"))?,
            k_proj: w.linear(&format!("{p}.k_proj"))?,
            v_proj: w.linear(&format!("{p}.v_proj"))?,
            o_proj: w.linear(&format!("{p}.o_proj"))?,
            q_norm: GemmaNorm::load(w, &format!("{p}.q_norm"), c.rms_norm_eps)?,
            k_norm: GemmaNorm::load(w, &format!("{p}.k_norm"), c.rms_norm_eps)?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            rope: c.rope(i)?,
            scale,
            window: c.window(i),
        })
    }

    /// x: [N, D], N = B*L -> [N, D]; `bl` = (B, L).
    fn forward(&self, x: &Array, bl: (i32, i32), layer: u32, pos: &Positions, attn: &mut dyn Attend) -> Result<Array> {
        let q = split_heads_of(&self.q_proj.forward(x)?, bl, self.heads)?; // [B, H, L, hd]
        let k = split_heads_of(&self.k_proj.forward(x)?, bl, self.kv_heads)?; // [B, K, L, hd]
        let v = split_heads_of(&self.v_proj.forward(x)?, bl, self.kv_heads)?; // [B, K, L, hd]
        let q = self.rope.apply_at(&self.q_norm.forward(&q)?, pos)?; // [B, H, L, hd]
        let k = self.rope.apply_at(&self.k_norm.forward(&k)?, pos)?; // [B, K, L, hd]
        let o = attn.attend(layer, q, k, v, &AttendOpts::plain(self.scale).window(self.window))?; // [B, H, L, hd]
        self.o_proj.forward(&merge_heads_to_rows(&o)?) // [N, H*hd] -> [N, D]
    }
}

// ---- MLP: rmlx_nn::gemma::GeluMlp, down(gelu_approx(gate(x)) * up(x)) ----

// ---- block ----

/// h = x + post_attn_norm(attn(input_norm(x)));
/// out = h + post_ff_norm(mlp(pre_ff_norm(h))).
pub struct GemmaBlock {
    self_attn: GemmaAttention,
    mlp: GeluMlp,
    input_layernorm: GemmaNorm,            // [D]
    post_attention_layernorm: GemmaNorm,   // [D]
    pre_feedforward_layernorm: GemmaNorm,  // [D]
    post_feedforward_layernorm: GemmaNorm, // [D]
}

impl GemmaBlock {
    fn load(w: &mut Weights, p: &str, c: &Config, i: i32) -> Result<Self> {
        let norm = |w: &mut Weights, n: &str| GemmaNorm::load(w, &format!("{p}.{n}"), c.rms_norm_eps);
        Ok(Self {
            self_attn: GemmaAttention::load(w, &format!("{p}.self_attn"), c, i)?,
            mlp: GeluMlp::load(w, &format!("{p}.mlp"))?,
            input_layernorm: norm(w, "input_layernorm")?,
            post_attention_layernorm: norm(w, "post_attention_layernorm")?,
            pre_feedforward_layernorm: norm(w, "pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm(w, "post_feedforward_layernorm")?,
        })
    }

    /// x: [N, D], N = B*L -> [N, D]; `bl` = (B, L).
    fn forward(&self, x: &Array, bl: (i32, i32), layer: u32, pos: &Positions, attn: &mut dyn Attend) -> Result<Array> {
        let r = self.self_attn.forward(&self.input_layernorm.forward(x)?, bl, layer, pos, attn)?;
        let h = clip_residual(x, &self.post_attention_layernorm.forward(&r)?)?;
        let r = self.mlp.forward(&self.pre_feedforward_layernorm.forward(&h)?)?;
        clip_residual(&h, &self.post_feedforward_layernorm.forward(&r)?)
    }
}

// ---- model ----

pub struct Gemma3Text {
    config: Config,
    embed_tokens: EmbeddingLayer, // [V, D]
    layers: Vec<GemmaBlock>,
    norm: GemmaNorm,              // [D]
    lm_head: Option<LinearLayer>, // [D] -> [V]; None when tied
}

impl Gemma3Text {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        Self::load_under(Config::parse(config_json)?, w, "")
    }

    /// The language model with its tensors under `prefix`: "" for
    /// gemma3_text checkpoints, "language_model." inside gemma3's (gemma3.rs).
    pub(crate) fn load_under(c: Config, w: &mut Weights, prefix: &str) -> Result<Self> {
        let embed_tokens = w.embedding(&format!("{prefix}model.embed_tokens"))?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| GemmaBlock::load(w, &format!("{prefix}model.layers.{i}"), &c, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = GemmaNorm::load(w, &format!("{prefix}model.norm"), c.rms_norm_eps)?;
        let lm_head = sanitize_head(w, prefix)?;
        Ok(Self { config: c, embed_tokens, layers, norm, lm_head })
    }
}

impl ModelImpl for Gemma3Text {
    fn spec(&self) -> ModelSpec {
        cache_spec(&self.config)
    }

    /// tokens: [B, L] -> logits [B, L | 1, V]
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        if attn.output() == Output::Media {
            return Err(PluginError::unsupported("gemma3_text has no media encoder (model_type gemma3 has one)"));
        }
        let pos = Positions::of(attn); // each row's first position
        let bl = (tokens.dim(0), tokens.dim(1));
        let h = self.embed_tokens.lookup(tokens)?; // [B, L, D]
        // mlx-vlm merges image features before the embedding scale.
        let h = merge_inputs(h, attn)?; // [B, L, D]
        let h = scale_embeddings(&h, self.config.hidden_size)?; // [B, L, D]
        let mut h = h.reshape(&[bl.0 * bl.1, -1])?; // [N, D]
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, bl, i as u32, &pos, attn)?;
            offer_hidden_rows(attn, i as u32, &h, bl)?;
        }
        let h = self.norm.forward(&h)?; // [N, D]
        // -> [B, L, D] hidden, [B, L, V] or [B, 1, V] logits
        finish_rows(h, bl, attn, |h| match &self.lm_head {
            Some(head) => head.forward(h),         // rows [N | B, D] -> [N | B, V]
            None => self.embed_tokens.as_linear(h), // rows [N | B, D] -> [N | B, V]
        })
    }
}

// ---- weight sanitising ----

/// mlx-lm's `sanitize`: without `lm_head.weight` the head is the embedding
/// (tied); with it, `lm_head` is its own layer.
fn sanitize_head(w: &mut Weights, prefix: &str) -> Result<Option<LinearLayer>> {
    if w.contains(&format!("{prefix}lm_head.weight")) {
        Ok(Some(w.linear(&format!("{prefix}lm_head"))?))
    } else {
        Ok(None)
    }
}

// ---- cache spec ----

fn cache_spec(c: &Config) -> ModelSpec {
    let dims = Dims {
        num_layers: c.num_hidden_layers,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        max_context: c.max_position_embeddings,
    };
    model_spec(dims, |i| c.window(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Result<Config> {
        Config::parse(&format!(
            r#"{{"model_type":"gemma3_text","hidden_size":64,"num_hidden_layers":4,"intermediate_size":128,
               "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"vocab_size":256,
               "sliding_window":8,"sliding_window_pattern":3{extra}}}"#
        ))
    }

    #[test]
    fn layers_follow_the_pattern() {
        let c = cfg("").unwrap();
        assert_eq!((0..4).map(|i| c.window(i)).collect::<Vec<_>>(), [8, 8, 0, 8]);
        let c = cfg(r#","layer_types":["sliding_attention","sliding_attention","full_attention","sliding_attention"]"#);
        assert!(c.is_ok());
    }

    #[test]
    fn mlx_lm_defaults_apply() {
        let c = Config::parse(r#"{"model_type":"gemma3_text"}"#).unwrap();
        assert_eq!((c.hidden_size, c.num_hidden_layers, c.head_dim, c.sliding_window, c.sliding_window_pattern), (1152, 26, 256, 512, 6));
        assert_eq!((c.rope_theta, c.rope_local_base_freq, c.query_pre_attn_scalar), (1e6, 1e4, 256.0));
    }

    #[test]
    fn refuses_what_it_does_not_implement_by_name() {
        let err = |extra: &str| cfg(extra).unwrap_err().message.to_string();
        assert!(err(r#","layer_types":["full_attention","sliding_attention","full_attention","sliding_attention"]"#)
            .contains("layer_types[0]"));
        assert!(err(r#","final_logit_softcapping":30.0"#).contains("final_logit_softcapping"));
        assert!(err(r#","attn_logit_softcapping":50.0"#).contains("attn_logit_softcapping"));
        assert!(err(r#","hidden_activation":"silu""#).contains("hidden_activation"));
        assert!(err(r#","use_bidirectional_attention":true"#).contains("use_bidirectional_attention"));
        assert!(err(r#","rope_scaling":{"rope_type":"yarn","factor":4.0}"#).contains("yarn"));
        assert!(err(r#","sliding_window_pattern":0"#).contains("sliding_window_pattern"));
        assert!(err(r#","num_key_value_heads":3"#).contains("num_key_value_heads"));
        assert!(err(r#","rope_parameters":{"full_attention":{"rope_type":"default","rope_theta":500000.0}}"#)
            .contains("rope_parameters.full_attention.rope_theta"));
        // null soft-caps (real Gemma 3 configs) and the nested keys that agree are fine.
        assert!(cfg(r#","final_logit_softcapping":null,"attn_logit_softcapping":null,"hidden_activation":"gelu_pytorch_tanh","rope_parameters":{"full_attention":{"rope_type":"default","rope_theta":1000000.0},"sliding_attention":{"rope_type":"default","rope_theta":10000.0}}"#).is_ok());
        // linear rope_scaling on the global layers (Gemma 3 4B and up) is supported.
        assert!(cfg(r#","rope_scaling":{"rope_type":"linear","factor":8.0}"#).is_ok());
    }
}
