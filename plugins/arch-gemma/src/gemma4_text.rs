//! model_type `gemma4_text` (Gemma 4 text decoders).
//! Mirrors mlx_lm/models/gemma4_text.py (mlx-lm 0.32.2):
//! - plain RMSNorm (weight as stored, unlike Gemma 3's `1 + weight`), also
//!   on q and k per head; values get an RMSNorm without scale (`v_norm`);
//! - embeddings scaled by sqrt(hidden) (a Python float, not rounded);
//! - sliding and global (full) layers by `layer_types` (else
//!   `sliding_window_pattern`); global layers may have their own head size
//!   (`global_head_dim`), their own K/V heads and values equal to the raw
//!   keys (`attention_k_eq_v`, `num_global_key_value_heads`); each layer
//!   type has its own RoPE from `rope_parameters` (the `proportional` type
//!   rotates only `partial_rotary_factor` of the head);
//! - attention scale 1 (the q/k norms do the scaling);
//! - the last `num_kv_shared_layers` layers compute no K/V: each reads that
//!   of the last earlier layer of its type (`cache_kind::SHARED`);
//! - the gated tanh-GELU MLP, optionally beside a mixture of experts
//!   (`enable_moe_block`: a scaled router, top-k, GELU experts);
//! - per-layer inputs (`hidden_size_per_layer_input`): a second embedding
//!   table plus a projection of the embeddings, one [P] slice per layer
//!   gated into the residual stream after the MLP;
//! - a learned per-layer scalar on each block's output;
//! - the head tied to the embedding unless `tie_word_embeddings` is false,
//!   then soft-capped (`final_logit_softcapping`).
//!
//! The residual stream runs as rows [N, D], N = B*L, from the scaled
//! embeddings to the final norm, so every linear gets a 2-D input (MLX's
//! matmul adds a Flatten and an Unflatten for a [B, L, D] one; the same
//! product otherwise); [B, L, ...] only for the token embeddings and the
//! merge of input features, the heads, the host's hidden states and the
//! logits.
//!
//! Shapes: B batch, L new tokens, N = B*L rows, D hidden, H query heads,
//! K kv heads, hd head_dim, NL layers, P per-layer input size, V vocab.
//!
//! Files: gemma4_text/config.rs (the config and each layer's shape),
//! gemma4_text/layers.rs (attention, MLP/experts, the block); this file the
//! per-layer inputs and the model.
mod config;
mod layers;

pub use config::Config;
use layers::Gemma4Block;
use mlx_rs::{ops, Array};
use rmlx_nn::decoder::{model_spec, Dims};
use rmlx_nn::gemma::logit_softcap;
use rmlx_nn::{finish_rows, merge_inputs, offer_hidden_rows, rms_norm, Positions};
use rmlx_plugin_api::{
    author::{Attend, EmbeddingLayer, LinearLayer, ModelImpl, Result, Weights},
    cache_kind, LayerCache, ModelSpec, PluginError,
};

// ---- per-layer inputs ----

/// The model-level half of the per-layer inputs: token embeddings of their
/// own plus a projection of the scaled input embeddings.
struct PerLayerInputs {
    embed_tokens_per_layer: EmbeddingLayer,   // [V, NL*P]
    per_layer_model_projection: LinearLayer, // [D] -> [NL*P]
    per_layer_projection_norm: Array,         // [P]
    layers: i32,
    size: i32,
    hidden: i32,
    eps: f32,
}

impl PerLayerInputs {
    /// tokens: [B, L], h: the scaled embeddings as rows [N, D], N = B*L
    /// -> NL x [N, P]
    fn forward(&self, tokens: &Array, h: &Array) -> Result<Vec<Array>> {
        let s = |v: f64| Array::from_f32(v as f32).as_dtype(h.dtype());
        let (nl, p, rows) = (self.layers, self.size, h.dim(0));
        let own = self.embed_tokens_per_layer.lookup(tokens)?.multiply(s((p as f64).sqrt())?)?; // [B, L, NL*P]
        let own = own.reshape(&[rows, nl, p])?; // [N, NL, P]
        let proj = self.per_layer_model_projection.forward(h)?.multiply(s((self.hidden as f64).powf(-0.5))?)?; // [N, NL*P]
        let proj = rms_norm(&ops::unflatten(&proj, -1, &[nl, p])?, &self.per_layer_projection_norm, self.eps)?; // [N, NL, P]
        let all = proj.add(&own)?.multiply(s(0.5f64.sqrt())?)?; // [N, NL, P]
        all.split_equal(nl, 1)?.into_iter().map(|x| Ok(x.squeeze_axes(&[1])?)).collect() // NL x [N, P]
    }
}

// ---- model ----

pub struct Gemma4Text {
    config: Config,
    embed_tokens: EmbeddingLayer, // [V, D]
    per_layer_inputs: Option<PerLayerInputs>,
    layers: Vec<Gemma4Block>,
    norm: Array,                  // [D]
    lm_head: Option<LinearLayer>, // [D] -> [V]; None when tied
    /// Inside gemma4 (gemma4.rs): the multimodal token ids.
    mm: Option<Vec<i32>>,
}

impl Gemma4Text {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        Self::load_under(Config::parse(config_json)?, w, "")
    }

    /// The language model with its tensors under `prefix`: "" for
    /// gemma4_text checkpoints, "language_model." inside gemma4's (gemma4.rs).
    pub(crate) fn load_under(c: Config, w: &mut Weights, prefix: &str) -> Result<Self> {
        // mlx-lm's `sanitize` splits a Hugging Face checkpoint's fused experts.
        if let Some(i) = (0..c.num_hidden_layers).find(|i| w.contains(&format!("{prefix}model.layers.{i}.experts.gate_up_proj"))) {
            return Err(PluginError::config(format!(
                "{prefix}model.layers.{i}.experts.gate_up_proj: fused experts of a Hugging Face checkpoint; convert it with mlx_lm.convert (or mlx_vlm.convert) first"
            )));
        }
        let embed_tokens = w.embedding(&format!("{prefix}model.embed_tokens"))?;
        let per_layer_inputs = match c.per_layer_input() {
            Some(p) => Some(PerLayerInputs {
                embed_tokens_per_layer: w.embedding(&format!("{prefix}model.embed_tokens_per_layer"))?,
                per_layer_model_projection: w.linear(&format!("{prefix}model.per_layer_model_projection"))?,
                per_layer_projection_norm: w.tensor(&format!("{prefix}model.per_layer_projection_norm.weight"))?,
                layers: c.num_hidden_layers,
                size: p,
                hidden: c.hidden_size,
                eps: c.rms_norm_eps,
            }),
            None => None,
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| Gemma4Block::load(w, &format!("{prefix}model.layers.{i}"), &c, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = w.tensor(&format!("{prefix}model.norm.weight"))?;
        let lm_head = if c.tie_word_embeddings { None } else { Some(w.linear(&format!("{prefix}lm_head"))?) };
        Ok(Self { config: c, embed_tokens, per_layer_inputs, layers, norm, lm_head, mm: None })
    }

    /// As mlx-vlm's gemma4 `get_input_embeddings` feeds its language model:
    /// input features replace the embeddings *after* the sqrt(hidden) scale,
    /// and the per-layer token embeddings read token 0 (pad) at the
    /// positions of these multimodal token ids (image, audio, video).
    pub(crate) fn set_multimodal(&mut self, ids: Vec<i32>) {
        self.mm = Some(ids);
    }

    /// tokens [B, L] with the multimodal ids replaced by 0.
    fn per_layer_tokens(&self, tokens: &Array) -> Result<Array> {
        let Some(ids) = &self.mm else { return Ok(tokens.clone()) };
        let mut out = tokens.clone();
        let zero = Array::from_int(0).as_dtype(tokens.dtype())?;
        for &id in ids {
            let hit = tokens.eq(Array::from_int(id).as_dtype(tokens.dtype())?)?; // [B, L]
            out = ops::select(&hit, &zero, &out)?;
        }
        Ok(out)
    }
}

impl ModelImpl for Gemma4Text {
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
        model_spec(dims, |i| c.window(i))
    }

    /// Full or window layers with their own heads and head size; the last
    /// `num_kv_shared_layers` SHARED with the last earlier layer of their type.
    fn layers(&self) -> Vec<LayerCache> {
        let c = &self.config;
        (0..c.num_hidden_layers)
            .map(|i| {
                let src = c.kv_source(i).unwrap_or(i);
                let kind = match (src != i, c.is_global(i)) {
                    (true, _) => cache_kind::SHARED,
                    (false, true) => cache_kind::FULL,
                    (false, false) => cache_kind::WINDOW,
                };
                LayerCache {
                    kind,
                    window: c.window(i),
                    kv_heads: c.kv_heads(i) as u32,
                    head_dim: c.head_dim(i) as u32,
                    shared_with: src as u32,
                }
            })
            .collect()
    }

    /// tokens: [B, L] -> logits [B, L | 1, V]
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        let c = &self.config;
        let pos = Positions::of(attn); // each row's first position
        let bl = (tokens.dim(0), tokens.dim(1));
        let h = self.embed_tokens.lookup(tokens)?; // [B, L, D]
        let scale = |h: Array| -> Result<Array> {
            Ok(h.multiply(Array::from_f32((c.hidden_size as f64).sqrt() as f32).as_dtype(h.dtype())?)?)
        };
        // Text-only gemma4_text merges input features before the scale;
        // inside gemma4, mlx-vlm merges them after it.
        let h = match self.mm {
            None => scale(merge_inputs(h, attn)?)?,   // [B, L, D]
            Some(_) => merge_inputs(scale(h)?, attn)?, // [B, L, D]
        };
        let mut h = h.reshape(&[bl.0 * bl.1, -1])?; // [N, D]
        let per_layer = match &self.per_layer_inputs {
            Some(p) => p.forward(&self.per_layer_tokens(tokens)?, &h)?.into_iter().map(Some).collect(), // NL x [N, P]
            None => vec![None; self.layers.len()],
        };
        for (i, (layer, pli)) in self.layers.iter().zip(&per_layer).enumerate() {
            h = layer.forward(&h, bl, pli.as_ref(), i as u32, &pos, attn)?;
            offer_hidden_rows(attn, i as u32, &h, bl)?;
        }
        let h = rms_norm(&h, &self.norm, c.rms_norm_eps)?; // [N, D]
        let cap = c.final_logit_softcapping;
        // -> [B, L, D] hidden, [B, L, V] or [B, 1, V] logits
        finish_rows(h, bl, attn, |h| {
            let logits = match &self.lm_head {
                Some(head) => head.forward(h)?,         // rows [N | B, D] -> [N | B, V]
                None => self.embed_tokens.as_linear(h)?, // rows [N | B, D] -> [N | B, V]
            };
            match cap {
                Some(cap) => logit_softcap(&logits, cap as f32),
                None => Ok(logits),
            }
        })
    }
}

#[cfg(test)]
#[path = "gemma4_text_tests.rs"]
mod tests;
