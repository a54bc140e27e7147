//! model_type `qwen3_5_mtp` (and `qwen3_5_moe_mtp`): the multi-token-
//! prediction head that Qwen3.5 / 3.6 checkpoints ship under `mtp.*`, as a
//! drafter head (plugin ABI 3.6, `Model::conditioning`). Mirrors mlx-vlm's
//! `Qwen3_5MTPDraftModel` (mlx_vlm/speculative/drafters/qwen3_5_mtp):
//!
//!   e = embed(t)                         the verifier's embedding
//!   x = fc([norm_e(e) ; norm_h(c)])      c: the conditioning, [B, L, D]
//!   x = block_i(x) for the head's layers (full gated attention, the
//!       verifier's MLP or MoE; its own K/V, positions of its own cache)
//!   s = norm(x)                          the head's state (`HEAD_STATE`)
//!   logits = lm_head(s)                  the verifier's head
//!
//! For token t at position p the conditioning is the verifier's last block
//! output (before its final norm) at p - 1, so the head runs one position
//! behind the verifier: after a prompt p_0..p_{n-1} and its first sampled
//! token t_n, it prefills [p_1 .. p_{n-1}, t_n] with the verifier's hidden
//! states h_0..h_{n-1}, and its last logits propose t_{n+1}. A chained draft
//! step feeds the proposed token with the head's own state `s` of the step
//! before in place of the verifier's hidden states.
//!
//! Weights come from the verifier's checkpoint (the same `WeightSource`):
//! the embedding and LM head where the verifier keeps them (qwen3_5.rs
//! `layout`), the head under `mtp.`: `fc` [2D] -> [D], `pre_fc_norm_embedding`
//! and `pre_fc_norm_hidden` [D], `layers.{i}` (`mtp_num_hidden_layers`,
//! default 1) and `norm` [D]. `mtp.*` tensors exist only in Hugging Face
//! checkpoints (mlx-lm's convert drops them), so the head's RMSNorm weights
//! are read as Hugging Face stores them: offsets from 1, as mlx-vlm's
//! `sanitize` reads them.
//!
//! Shapes: B batch, L new tokens, D hidden, V vocab.
use crate::hybrid::Hybrid;
use crate::hybrid_block::HybridBlock;
use crate::qwen3_5::{layout, Config};
use mlx_rs::Array;
use rmlx_nn::head::head_conditioning;
use rmlx_nn::{concatenate, finish, offer_hidden, rms_norm, Positions};
use rmlx_plugin_api::{
    author::{Attend, EmbeddingLayer, LinearLayer, ModelImpl, Result, Weights},
    LayerCache, ModelSpec, PluginError, HEAD_STATE,
};
use serde_json::Value;

// ---- config ----

/// The head's settings: the verifier's text config, with
/// `mtp_num_hidden_layers` full-attention layers.
fn config(config_json: &str, model_type: &'static str) -> Result<(Hybrid, i32)> {
    let mut c = Config::parse(config_json, model_type)?;
    let v: Value = serde_json::from_str(config_json).map_err(|e| PluginError::config(format!("config.json: {e}")))?;
    let text = v.get("text_config").filter(|t| t.is_object()).unwrap_or(&v);
    let depth = match text.get("mtp_num_hidden_layers") {
        None | Some(Value::Null) => 1,
        Some(n) => n.as_i64().filter(|&n| (1..=16).contains(&n)).ok_or_else(|| {
            PluginError::config(format!("mtp_num_hidden_layers must be an integer in 1..=16, got {n}"))
        })? as i32,
    };
    let verifier_layers = c.num_hidden_layers;
    c.num_hidden_layers = depth;
    c.full_attention_interval = 1; // every head layer is full attention
    c.layer_types = None;
    c.hf_layout = true; // norms as offsets from 1 (see the module doc)
    c.check()?;
    Ok((c, verifier_layers))
}

/// `model_type` without the `_mtp` suffix: the verifier's config parser.
fn verifier_type(model_type: &str) -> Result<&'static str> {
    match model_type {
        "qwen3_5_mtp" => Ok("qwen3_5"),
        "qwen3_5_moe_mtp" => Ok("qwen3_5_moe"),
        other => Err(PluginError::unsupported(format!("arch-qwen3 has no MTP head for {other}"))),
    }
}

pub fn check(model_type: &str, config_json: &str) -> Result<()> {
    config(config_json, verifier_type(model_type)?).map(|_| ())
}

// ---- model ----

pub struct Qwen3_5Mtp {
    config: Hybrid,
    embed_tokens: EmbeddingLayer,  // [V, D], the verifier's
    pre_fc_norm_embedding: Array,  // [D]
    pre_fc_norm_hidden: Array,     // [D]
    fc: LinearLayer,               // [2D] -> [D]
    layers: Vec<HybridBlock>,
    norm: Array,                   // [D]
    lm_head: Option<LinearLayer>,  // [D] -> [V]; None when tied
}

impl Qwen3_5Mtp {
    pub fn load(model_type: &str, config_json: &str, w: &mut Weights) -> Result<Self> {
        let vt = verifier_type(model_type)?;
        // Where the verifier keeps its embedding and head.
        let mut verifier = Config::parse(config_json, vt)?;
        let (model, head) = layout(w, &mut verifier)?;
        let (c, _) = config(config_json, vt)?;
        let p = ["mtp.", "language_model.mtp.", "model.mtp."]
            .into_iter()
            .find(|p| w.contains(&format!("{p}fc.weight")))
            .ok_or_else(|| {
                PluginError::config(
                    "this checkpoint has no multi-token-prediction head (no `mtp.fc.weight`): \
                     mlx-lm's convert drops `mtp.*`; use the Hugging Face checkpoint, or a separate --draft-model",
                )
            })?;
        let embed_tokens = w.embedding(&format!("{model}embed_tokens"))?;
        let norm = |w: &mut Weights, n: &str| -> Result<Array> {
            let t = w.tensor(&format!("{p}{n}.weight"))?;
            Ok(t.add(Array::from_f32(1.0).as_dtype(t.dtype())?)?)
        };
        let pre_fc_norm_embedding = norm(w, "pre_fc_norm_embedding")?;
        let pre_fc_norm_hidden = norm(w, "pre_fc_norm_hidden")?;
        let fc = w.linear(&format!("{p}fc"))?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| HybridBlock::load(w, &c, i, &format!("{p}layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = norm(w, "norm")?;
        let tied = c.tie_word_embeddings || !w.contains(&format!("{head}.weight"));
        let lm_head = if tied { None } else { Some(w.linear(head)?) };
        Ok(Self { config: c, embed_tokens, pre_fc_norm_embedding, pre_fc_norm_hidden, fc, layers, norm: final_norm, lm_head })
    }
}

impl ModelImpl for Qwen3_5Mtp {
    // ---- cache spec ----
    fn spec(&self) -> ModelSpec {
        self.config.model_spec()
    }

    /// Every head layer is full attention (`full_attention_interval` 1).
    fn layers(&self) -> Vec<LayerCache> {
        self.config.layer_caches()
    }

    /// The verifier's last block, before its final norm.
    fn conditioning(&self) -> Vec<i32> {
        vec![-1]
    }

    /// tokens: [B, L], conditioning [B, L, D] (input_embeddings) -> logits
    /// [B, L | 1, V] (or the state [B, L, D]); the state goes to HEAD_STATE
    /// when the host asks.
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        let eps = self.config.rms_norm_eps;
        let (b, l, d) = (tokens.dim(0), tokens.dim(1), self.config.hidden_size);
        let cond = head_conditioning(attn, (b, l), d, "MTP head")?; // [B, L, D]
        let pos = Positions::of(attn); // the head's own cache positions
        let e = self.embed_tokens.lookup(tokens)?; // [B, L, D]
        let cond = cond.as_dtype(e.dtype())?;
        let x = concatenate(
            &[rms_norm(&e, &self.pre_fc_norm_embedding, eps)?, rms_norm(&cond, &self.pre_fc_norm_hidden, eps)?],
            -1,
        )?; // [B, L, 2D]
        let mut h = self.fc.forward(&x)?; // [B, L, D]
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, (b, l), i as u32, &pos, attn)?;
        }
        let s = rms_norm(&h, &self.norm, eps)?; // [B, L, D]
        offer_hidden(attn, HEAD_STATE, &s)?;
        finish(s, attn, |s| match &self.lm_head {
            Some(head) => head.forward(s),
            None => self.embed_tokens.as_linear(s),
        })
    }
}
