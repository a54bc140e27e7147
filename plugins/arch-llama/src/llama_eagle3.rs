//! model_type `llama_eagle3` (and `speculator_model_eagle3`): an Eagle-3
//! draft head (Li et al. 2025, "EAGLE-3"), a drafter head of plugin ABI 3.6
//! (`Model::conditioning`, `HEAD_STATE`), loaded from its own sidecar
//! directory (`LoadedModel::load_head_from(sidecar, verifier, "eagle3")`; the
//! host names it `{sidecar model_type}_eagle3`: `llama` for checkpoints in
//! the EAGLE / SGLang layout, `speculator_model` for the `speculators`
//! library's). Mirrors mlx-vlm's `Eagle3DraftModel`
//! (mlx_vlm/speculative/drafters/eagle3):
//!
//!   c = [g_a ; g_b ; g_c]                the verifier's blocks a, b, c  [B, L, 3T]
//!   x = fc(input_norm?(c))               fused hidden                  [B, L, D]
//!       (a chained step passes the head's own state x [B, L, D] instead)
//!   e = embed(t)                         the verifier's embedding      [B, L, D]
//!   layer 0: a = attn([norm_i(e) ; norm_h(x)])  (q/k/v from 2D)        [B, L, D]
//!            h = r + a, r = norm_h(x) if norm_before_residual else x
//!            h = h + mlp(norm_p(h))
//!   layers 1..: plain llama blocks
//!   state = h                            (`HEAD_STATE`, before the final norm)
//!   logits = lm_head(norm(h))            over the draft vocabulary     [B, L, Vd]
//!            scattered to the verifier's: draft id i is token i + d2t[i],
//!            every other token -inf                                    [B, L, V]
//!
//! The head runs one position behind the verifier (engine/speculative/mtp.rs
//! drives it as it drives an MTP head): its entry j is token c_{j+1} with
//! the verifier's hidden states at j. Its RoPE positions are its own cache's
//! plus one, as mlx-vlm counts them (attention only sees their differences).
//!
//! Config: the decoder layer's llama keys under `transformer_layer_config`
//! (speculators) or at the top (EAGLE / SGLang); `draft_vocab_size`
//! (default: the vocabulary), `target_hidden_size` (default: hidden_size),
//! `norm_before_residual`, `norm_before_fc`, `tie_word_embeddings` (only
//! without a draft vocabulary). The verifier layers read: `capture_layer_ids`
//! (block outputs), else `target_layer_ids` or `eagle_aux_hidden_state_layer_ids`
//! (top level or under `eagle_config`: Hugging Face hidden-state indices, so
//! block i - 1, at least 0), else Eagle-3's default [2, N/2, N-3] over the
//! verifier's N layers (`verifier_config`, which the host adds; mlx-vlm
//! takes N from the head's own config, which has one layer).
//!
//! Weights: `fc`, `layers.0` (or `midlayer`) with `hidden_norm`, `layers.{i}`,
//! `norm`, `lm_head`, `d2t` (ignored: `t2d`); the embedding is the
//! verifier's `model.embed_tokens` (as mlx-vlm's `bind`), else the sidecar's
//! `embed_tokens`.
//!
//! Shapes: B batch, L new tokens, D hidden, T the verifier's hidden,
//! V the verifier's vocabulary, Vd the draft vocabulary.
use crate::llama;
use mlx_rs::{ops, Array, Dtype};
use rmlx_nn::decoder::{model_spec, AttentionSpec, Block, Dims, Mlp, SelfAttention};
use rmlx_nn::{concatenate, finish, offer_hidden, require_grouped_heads, require_positive, rms_norm, Positions, Rope};
use rmlx_plugin_api::{
    author::{Attend, EmbeddingLayer, LinearLayer, ModelImpl, Result, Weights},
    ModelSpec, PluginError, HEAD_STATE,
};
use serde_json::Value;

// ---- config ----

pub struct Config {
    /// The decoder layers' llama settings (`num_hidden_layers`: the head's).
    pub text: llama::Config,
    pub draft_vocab_size: i32,
    pub target_hidden_size: i32,
    pub norm_before_residual: bool,
    pub norm_before_fc: bool,
    pub tie_word_embeddings: bool,
    /// The verifier blocks whose outputs the head reads, in fc's order.
    pub capture: Vec<i32>,
}

fn int(v: &Value, key: &str) -> Result<Option<i32>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(n) => n.as_i64().map(|n| Some(n as i32)).ok_or_else(|| PluginError::config(format!("{key} must be an integer, got {n}"))),
    }
}

fn flag(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn ids(v: &Value, key: &str) -> Result<Option<Vec<i32>>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|x| x.as_i64().map(|x| x as i32).ok_or_else(|| PluginError::config(format!("{key}: {x} is not an integer"))))
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(Value::Array(_)) => Ok(None),
        Some(x) => Err(PluginError::config(format!("{key} must be a list of layer ids, got {x}"))),
    }
}

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(json).map_err(|e| PluginError::config(format!("config.json: {e}")))?;
        let text_v = v.get("transformer_layer_config").filter(|t| t.is_object()).unwrap_or(&v);
        let text: llama::Config =
            serde_json::from_value(text_v.clone()).map_err(|e| PluginError::config(format!("config.json (the head's decoder layer): {e}")))?;
        require_positive(&[("hidden_size", text.hidden_size), ("num_hidden_layers", text.num_hidden_layers), ("vocab_size", text.vocab_size)])?;
        require_grouped_heads(text.num_attention_heads, text.num_key_value_heads.unwrap_or(text.num_attention_heads))?;
        let draft_vocab_size = int(&v, "draft_vocab_size")?.unwrap_or(text.vocab_size);
        let target_hidden_size = int(&v, "target_hidden_size")?.unwrap_or(text.hidden_size);
        require_positive(&[("draft_vocab_size", draft_vocab_size), ("target_hidden_size", target_hidden_size)])?;
        if draft_vocab_size > text.vocab_size {
            return Err(PluginError::config(format!(
                "draft_vocab_size {draft_vocab_size} exceeds the vocabulary of {}",
                text.vocab_size
            )));
        }
        if 3 * target_hidden_size == text.hidden_size {
            // The forward tells the verifier's conditioning from the head's own state by width.
            return Err(PluginError::config("3 * target_hidden_size equals hidden_size: the conditioning and the head's state cannot be told apart"));
        }
        let eagle = v.get("eagle_config").filter(|e| e.is_object());
        let capture = if let Some(c) = ids(&v, "capture_layer_ids")? {
            c
        } else {
            let target = match ids(&v, "target_layer_ids")? {
                Some(t) => t,
                None => match ids(&v, "eagle_aux_hidden_state_layer_ids")? {
                    Some(t) => t,
                    None => match eagle.map(|e| ids(e, "eagle_aux_hidden_state_layer_ids")).transpose()?.flatten() {
                        Some(t) => t,
                        None => {
                            let n = verifier_layers(&v).unwrap_or(text.num_hidden_layers);
                            vec![2, n / 2, (n - 3).max(0)]
                        }
                    },
                },
            };
            target.iter().map(|&i| (i - 1).max(0)).collect()
        };
        if capture.len() != 3 {
            return Err(PluginError::config(format!("an Eagle-3 head reads three verifier layers, the config names {}", capture.len())));
        }
        if let Some(bad) = capture.iter().find(|&&i| i < 0) {
            return Err(PluginError::config(format!("capture_layer_ids: {bad} is negative")));
        }
        Rope::new(head_dim(&text), text.rope_theta, text.rope_traditional, text.rope_scaling.as_ref())?;
        Ok(Self {
            draft_vocab_size,
            target_hidden_size,
            norm_before_residual: flag(&v, "norm_before_residual"),
            norm_before_fc: flag(&v, "norm_before_fc"),
            tie_word_embeddings: flag(&v, "tie_word_embeddings"),
            capture,
            text,
        })
    }

    fn uses_draft_vocab(&self) -> bool {
        self.draft_vocab_size != self.text.vocab_size
    }
}

/// The verifier's layer count from the `verifier_config` the host adds.
fn verifier_layers(v: &Value) -> Option<i32> {
    let vc = v.get("verifier_config")?;
    let t = vc.get("text_config").filter(|t| t.is_object()).unwrap_or(vc);
    t.get("num_hidden_layers")?.as_i64().map(|n| n as i32)
}

fn head_dim(t: &llama::Config) -> i32 {
    t.head_dim.unwrap_or(t.hidden_size / t.num_attention_heads)
}

fn attention_spec(t: &llama::Config) -> Result<AttentionSpec> {
    Ok(AttentionSpec {
        heads: t.num_attention_heads,
        kv_heads: t.num_key_value_heads.unwrap_or(t.num_attention_heads),
        head_dim: head_dim(t),
        qk_norm: false,
        eps: t.rms_norm_eps,
        window: 0,
        rope: Rope::new(head_dim(t), t.rope_theta, t.rope_traditional, t.rope_scaling.as_ref())?,
    })
}

// ---- first layer ----

/// Layer 0: attention over [norm(e) ; norm(x)] ([B, L, 2D] -> [B, L, D]).
struct FirstLayer {
    input_layernorm: Array,          // [D], on the embeddings
    hidden_norm: Array,              // [D], on the fused hidden
    self_attn: SelfAttention,        // q/k/v: [2D] -> [H*hd], [K*hd], [K*hd]
    post_attention_layernorm: Array, // [D]
    mlp: Mlp,                        // [D] -> [F] -> [D]
    norm_before_residual: bool,
    eps: f32,
}

impl FirstLayer {
    fn load(w: &mut Weights, p: &str, c: &Config) -> Result<Self> {
        Ok(Self {
            input_layernorm: w.tensor(&format!("{p}.input_layernorm.weight"))?,
            hidden_norm: w.tensor(&format!("{p}.hidden_norm.weight"))?,
            self_attn: SelfAttention::load(w, &format!("{p}.self_attn"), attention_spec(&c.text)?)?,
            post_attention_layernorm: w.tensor(&format!("{p}.post_attention_layernorm.weight"))?,
            mlp: Mlp::load(w, &format!("{p}.mlp"))?,
            norm_before_residual: c.norm_before_residual,
            eps: c.text.rms_norm_eps,
        })
    }

    /// e, x: [B, L, D] -> [B, L, D]
    fn forward(&self, e: &Array, x: &Array, pos: &Positions, attn: &mut dyn Attend) -> Result<Array> {
        let e = rms_norm(e, &self.input_layernorm, self.eps)?;
        let xn = rms_norm(x, &self.hidden_norm, self.eps)?;
        let bl = (x.dim(0), x.dim(1));
        let a = self.self_attn.forward(&concatenate(&[&e, &xn], -1)?, bl, 0, pos, attn)?; // [B, L, D]
        let h = if self.norm_before_residual { xn.add(&a)? } else { x.add(&a)? };
        let r = self.mlp.forward(&rms_norm(&h, &self.post_attention_layernorm, self.eps)?)?;
        Ok(h.add(&r)?)
    }
}

// ---- model ----

pub struct Eagle3 {
    config: Config,
    embed_tokens: EmbeddingLayer, // [V, D], the verifier's
    input_norm: Option<Array>,    // [3T], before fc (norm_before_fc)
    fc: LinearLayer,              // [3T] -> [D]
    first: FirstLayer,
    layers: Vec<Block>,           // layers 1..
    norm: Array,                  // [D]
    lm_head: Option<LinearLayer>, // [D] -> [Vd]; None when tied
    /// Per verifier token, its draft id, or Vd (a -inf column) when the
    /// draft vocabulary lacks it; None without a draft vocabulary.
    to_target: Option<Array>, // int32 [V]
}

/// The inverse of `d2t` [Vd]: int32 [V] of draft ids, Vd where none maps.
fn inverse_d2t(d2t: &[i32], vocab: i32) -> Result<Array> {
    let vd = d2t.len() as i32;
    let mut inv = vec![vd; vocab as usize];
    for (i, &off) in d2t.iter().enumerate() {
        let t = i as i32 + off;
        if !(0..vocab).contains(&t) {
            return Err(PluginError::config(format!("d2t maps draft id {i} to token {t}, outside the vocabulary of {vocab}")));
        }
        if inv[t as usize] != vd {
            return Err(PluginError::config(format!("d2t maps two draft ids to token {t}")));
        }
        inv[t as usize] = i as i32;
    }
    Ok(Array::from_slice(&inv, &[vocab]))
}

impl Eagle3 {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = Config::parse(config_json)?;
        let t = &c.text;
        // The verifier's embedding when it has the head's width (mlx-vlm's `bind`).
        let shared = ["model.embed_tokens", "language_model.model.embed_tokens", "model.language_model.embed_tokens"]
            .into_iter()
            .find(|p| c.target_hidden_size == t.hidden_size && w.contains(&format!("{p}.weight")));
        let embed_tokens = match shared {
            Some(p) => w.embedding(p)?,
            None if w.contains("embed_tokens.weight") => w.embedding("embed_tokens")?,
            None => {
                return Err(PluginError::missing(
                    "the Eagle-3 head has no embedding and the verifier has none of its width (model.embed_tokens)",
                ))
            }
        };
        let input_norm = if c.norm_before_fc { Some(w.tensor("input_norm.weight")?) } else { None };
        let fc = w.linear("fc")?;
        let p0 = if w.contains("midlayer.hidden_norm.weight") { "midlayer" } else { "layers.0" };
        let first = FirstLayer::load(w, p0, &c)?;
        let layers = (1..t.num_hidden_layers)
            .map(|i| Block::load(w, &format!("layers.{i}"), attention_spec(t)?))
            .collect::<Result<Vec<_>>>()?;
        let norm = w.tensor("norm.weight")?;
        let tied = !c.uses_draft_vocab() && (c.tie_word_embeddings || !w.contains("lm_head.weight"));
        let lm_head = if tied { None } else { Some(w.linear("lm_head")?) };
        let to_target = if c.uses_draft_vocab() {
            let d2t = w.tensor("d2t")?.as_dtype(Dtype::Int32)?; // [Vd]
            d2t.eval()?;
            if d2t.shape() != [c.draft_vocab_size] {
                return Err(PluginError::config(format!("d2t is {:?}, expected [{}]", d2t.shape(), c.draft_vocab_size)));
            }
            if w.contains("t2d") {
                w.tensor("t2d")?; // the same map as a mask over V; d2t says it all
            }
            Some(inverse_d2t(d2t.as_slice::<i32>(), t.vocab_size)?)
        } else {
            None
        };
        Ok(Self { config: c, embed_tokens, input_norm, fc, first, layers, norm, lm_head, to_target })
    }

    /// Draft-vocabulary logits [B, L, Vd] -> the verifier's [B, L, V].
    fn scatter(&self, logits: Array) -> Result<Array> {
        let Some(inv) = &self.to_target else { return Ok(logits) };
        let (b, l) = (logits.dim(0), logits.dim(1));
        let none = ops::broadcast_to(Array::from_f32(f32::NEG_INFINITY).as_dtype(logits.dtype())?, &[b, l, 1])?;
        let ext = concatenate(&[&logits, &none], -1)?; // [B, L, Vd + 1]
        // The gather's result may be strided; the host reads logits as rows.
        Ok(ext.take_axis(inv, -1)?.contiguous()?) // [B, L, V]
    }
}

impl ModelImpl for Eagle3 {
    // ---- cache spec ----
    fn spec(&self) -> ModelSpec {
        let t = &self.config.text;
        let dims = Dims {
            num_layers: t.num_hidden_layers,
            kv_heads: t.num_key_value_heads.unwrap_or(t.num_attention_heads),
            head_dim: head_dim(t),
            vocab_size: t.vocab_size,
            hidden_size: t.hidden_size,
            max_context: t.max_position_embeddings.unwrap_or(0),
        };
        model_spec(dims, |_| 0)
    }

    /// The verifier's blocks this head reads (outputs, before the final norm).
    fn conditioning(&self) -> Vec<i32> {
        self.config.capture.clone()
    }

    /// tokens: [B, L], conditioning (input_embeddings) [B, L, 3T] from the
    /// verifier or [B, L, D] from the head's own state -> logits [B, L | 1, V];
    /// the state [B, L, D] goes to HEAD_STATE when the host asks.
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        let c = &self.config;
        let (d, t3) = (c.text.hidden_size, 3 * c.target_hidden_size);
        let (cond, _) = attn.input_embeddings().ok_or_else(|| {
            PluginError::config("the Eagle-3 head needs its conditioning (the verifier's hidden states) as input embeddings")
        })?;
        let (b, l) = (tokens.dim(0), tokens.dim(1));
        let width = cond.dim(-1);
        if cond.ndim() != 3 || cond.dim(0) != b || cond.dim(1) != l || (width != d && width != t3) {
            return Err(PluginError::config(format!(
                "the Eagle-3 head's conditioning is {:?}, expected [{b}, {l}, {t3}] (the verifier's three layers) or [{b}, {l}, {d}] (its own state)",
                cond.shape()
            )));
        }
        let e = self.embed_tokens.lookup(tokens)?; // [B, L, D]
        let cond = cond.as_dtype(e.dtype())?;
        let x = if width == d {
            cond // [B, L, D]: a chained step
        } else {
            let cond = match &self.input_norm {
                Some(n) => rms_norm(&cond, n, c.text.rms_norm_eps)?,
                None => cond,
            };
            self.fc.forward(&cond)? // [B, L, 3T] -> [B, L, D]
        };
        let pos = Positions::PerRow(attn.offsets().add(Array::from_int(1))?); // mlx-vlm's positions
        let mut h = self.first.forward(&e, &x, &pos, attn)?; // [B, L, D]
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, (b, l), i as u32 + 1, &pos, attn)?;
        }
        offer_hidden(attn, HEAD_STATE, &h)?;
        let s = rms_norm(&h, &self.norm, c.text.rms_norm_eps)?; // [B, L, D]
        finish(s, attn, |s| {
            let logits = match &self.lm_head {
                Some(head) => head.forward(s)?,
                None => self.embed_tokens.as_linear(s)?,
            }; // [B, L, Vd]
            self.scatter(logits)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> String {
        format!(
            r#"{{"transformer_layer_config": {{"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
               "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 256}}, "draft_vocab_size": 128 {extra}}}"#
        )
    }

    #[test]
    fn layer_ids_come_from_the_config_or_eagle3s_default_over_the_verifier() {
        assert_eq!(Config::parse(&cfg(r#", "capture_layer_ids": [3, 1, 0]"#)).unwrap().capture, vec![3, 1, 0]);
        assert_eq!(Config::parse(&cfg(r#", "eagle_aux_hidden_state_layer_ids": [2, 16, 29]"#)).unwrap().capture, vec![1, 15, 28]);
        assert_eq!(Config::parse(&cfg(r#", "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 1]}"#)).unwrap().capture, vec![0, 1, 0]);
        // Eagle-3's [2, N/2, N-3] over a 32-layer verifier: blocks 1, 15, 28.
        assert_eq!(Config::parse(&cfg(r#", "verifier_config": {"num_hidden_layers": 32}"#)).unwrap().capture, vec![1, 15, 28]);
        assert!(Config::parse(&cfg(r#", "capture_layer_ids": [1, 2]"#)).is_err());
        assert!(Config::parse(&cfg("").replace("128", "300")).is_err(), "a draft vocabulary larger than the vocabulary");
    }

    #[test]
    fn d2t_inverts_and_refuses_collisions() {
        let inv = inverse_d2t(&[1, 1, 3], 8).unwrap();
        inv.eval().unwrap();
        assert_eq!(inv.as_slice::<i32>(), &[3, 0, 1, 3, 3, 2, 3, 3]);
        assert!(inverse_d2t(&[1, 0], 8).is_err()); // ids 0 and 1 both map to 1
        assert!(inverse_d2t(&[9], 8).is_err());
    }
}
