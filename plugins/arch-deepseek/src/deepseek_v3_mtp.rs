//! model_type `deepseek_v3_mtp`: the multi-token-prediction (MTP) module
//! DeepSeek-V3 checkpoints ship as one more decoder layer,
//! `model.layers.{num_hidden_layers}` (`num_nextn_predict_layers` of them),
//! as a drafter head (plugin ABI 3.6, `Model::conditioning`). After the
//! DeepSeek-V3 report (arXiv 2412.19437, section 2.2) and the engines that
//! serve it (vLLM's `DeepSeekMultiTokenPredictorLayer`, SGLang's
//! `deepseek_nextn`):
//!
//!   e = embed(t)                             the verifier's embedding
//!   c' = norm_final(c)                       c: the conditioning [B, L, D]
//!   x = eh_proj([enorm(e) ; hnorm(c')])      [2D] -> [D], embedding first
//!   h = block(x)                             a full decoder layer (MLA and
//!                                            the MoE; its own K/V cache)
//!   s = shared_head.norm(h)
//!   logits = shared_head.head(s)             the verifier's output head
//!
//! For token t at position p the conditioning is the verifier's last block
//! output (`conditioning` -1, the residual stream before its final norm) at
//! p - 1; the head applies the verifier's final norm `model.norm` to it
//! first, because vLLM and SGLang feed the module the verifier's normed
//! output (their models return it after `self.norm`), which is what the
//! published checkpoints are served with. The head runs one position behind
//! the verifier, as every `mtp` head does (docs/SPECULATIVE.md). A chained
//! draft step conditions on the head's own `h` (`HEAD_STATE`, before
//! `shared_head.norm`; vLLM feeds back the same `h`), which goes through
//! `norm_final` like the verifier's state: vLLM feeds it to `hnorm`
//! directly, so chained proposals differ slightly from vLLM's (DeepSeek
//! trained the module only one token ahead; chaining it is a heuristic in
//! every engine). vLLM also zeroes the embedding at position 0; the report
//! does not, and neither does this head.
//!
//! Weights, from the verifier's checkpoint (Hugging Face's layout: mlx-lm's
//! convert drops the module): under `model.layers.{N}.`, `enorm`, `hnorm`
//! [D], `eh_proj` [D, 2D], the decoder layer's own tensors (`self_attn.*`,
//! `mlp.*`, its two norms; deepseek_v3.rs `DecoderLayer`), `shared_head.norm`
//! [D]; the embedding and head from the module's own copies
//! (`embed_tokens`, `shared_head.head`) where the checkpoint has them,
//! else the verifier's `model.embed_tokens` and `lm_head` (DeepSeek shares
//! them: the copies are equal). Only the first module is read: a config
//! with `num_nextn_predict_layers` > 1 is refused by name.
//!
//! From `eh_proj` on the module runs on rows [N, D], N = B*L, as
//! deepseek_v3.rs's residual stream does (2-D inputs to every linear).
//!
//! Shapes: B batch, L new tokens, N = B*L rows, D hidden, V vocab.
use crate::deepseek_v3::{model_spec, Config, DecoderLayer};
use mlx_rs::Array;
use rmlx_nn::head::head_conditioning;
use rmlx_nn::{concatenate, finish_rows, offer_hidden_rows, rms_norm, Positions};
use rmlx_plugin_api::{
    author::{Attend, EmbeddingLayer, LinearLayer, ModelImpl, Result, Weights},
    ModelSpec, PluginError, HEAD_STATE,
};

// ---- config ----

/// The verifier's config, which must name exactly one MTP module.
fn config(config_json: &str) -> Result<Config> {
    let c = Config::parse(config_json)?;
    match c.num_nextn_predict_layers {
        1 => Ok(c),
        0 => Err(PluginError::config(
            "num_nextn_predict_layers is 0: this checkpoint has no multi-token-prediction module",
        )),
        n => Err(PluginError::config(format!(
            "num_nextn_predict_layers is {n}: the deepseek_v3_mtp head chains only the first module \
             (model.layers.{}), and would propose differently from a checkpoint trained with {n}",
            c.num_hidden_layers
        ))),
    }
}

pub fn check(config_json: &str) -> Result<()> {
    config(config_json).map(|_| ())
}

// ---- model ----

pub struct DeepseekV3Mtp {
    config: Config,
    embed_tokens: EmbeddingLayer, // [V, D]
    norm_final: Array,            // [D]: the verifier's `model.norm`
    enorm: Array,                 // [D]
    hnorm: Array,                 // [D]
    eh_proj: LinearLayer,         // [2D] -> [D]
    block: DecoderLayer,
    shared_head_norm: Array,      // [D]
    head: LinearLayer,            // [D] -> [V]
}

impl DeepseekV3Mtp {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = config(config_json)?;
        let n = c.num_hidden_layers;
        let p = format!("model.layers.{n}");
        if !w.contains(&format!("{p}.eh_proj.weight")) {
            return Err(PluginError::config(format!(
                "this checkpoint has no multi-token-prediction module (no `{p}.eh_proj.weight`): \
                 mlx-lm's convert drops it; use the Hugging Face checkpoint, or a separate --draft-model"
            )));
        }
        let own = |w: &Weights, name: &str| w.contains(&format!("{p}.{name}.weight"));
        let embed_tokens = if own(w, "embed_tokens") { w.embedding(&format!("{p}.embed_tokens"))? } else { w.embedding("model.embed_tokens")? };
        let head = if own(w, "shared_head.head") { w.linear(&format!("{p}.shared_head.head"))? } else { w.linear("lm_head")? };
        let norm_final = w.tensor("model.norm.weight")?;
        let enorm = w.tensor(&format!("{p}.enorm.weight"))?;
        let hnorm = w.tensor(&format!("{p}.hnorm.weight"))?;
        let eh_proj = w.linear(&format!("{p}.eh_proj"))?;
        let d = c.hidden_size as u32;
        let dims = eh_proj.0.dims();
        if (dims.0, dims.1) != (2 * d, d) {
            return Err(PluginError::config(format!("{p}.eh_proj maps {} -> {}; expected {} -> {d}", dims.0, dims.1, 2 * d)));
        }
        let block = DecoderLayer::load(w, &c, n, &p)?;
        let shared_head_norm = w.tensor(&format!("{p}.shared_head.norm.weight"))?;
        Ok(Self { config: c, embed_tokens, norm_final, enorm, hnorm, eh_proj, block, shared_head_norm, head })
    }
}

impl ModelImpl for DeepseekV3Mtp {
    // ---- cache spec ----
    /// One layer, cached as the verifier's (deepseek_v3.rs `model_spec`).
    fn spec(&self) -> ModelSpec {
        model_spec(&self.config, 1)
    }

    /// The verifier's last block, before its final norm (which the head
    /// applies itself).
    fn conditioning(&self) -> Vec<i32> {
        vec![-1]
    }

    /// tokens: [B, L], conditioning [B, L, D] (input_embeddings) -> logits
    /// [B, L | 1, V] (or the state [B, L, D]); `h` goes to HEAD_STATE when
    /// the host asks.
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        let eps = self.config.rms_norm_eps;
        let (b, l, d) = (tokens.dim(0), tokens.dim(1), self.config.hidden_size);
        let cond = head_conditioning(attn, (b, l), d, "MTP head")?; // [B, L, D]
        let pos = Positions::of(attn); // the head's own cache positions
        let e = self.embed_tokens.lookup(tokens)?; // [B, L, D]
        let c = rms_norm(&cond.as_dtype(e.dtype())?, &self.norm_final, eps)?; // [B, L, D]
        let x = concatenate(&[rms_norm(&e, &self.enorm, eps)?, rms_norm(&c, &self.hnorm, eps)?], -1)?; // [B, L, 2D]
        let x = self.eh_proj.forward(&x.reshape(&[b * l, 2 * d])?)?; // [N, 2D] -> [N, D]
        let h = self.block.forward(&x, (b, l), 0, &pos, attn)?; // [N, D]
        offer_hidden_rows(attn, HEAD_STATE, &h, (b, l))?;
        let s = rms_norm(&h, &self.shared_head_norm, eps)?; // [N, D]
        finish_rows(s, (b, l), attn, |s| self.head.forward(s)) // rows [N | B, D] -> [B, L | 1, V]
    }
}
