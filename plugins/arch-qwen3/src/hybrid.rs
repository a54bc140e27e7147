//! The gated DeltaNet hybrid decoder shared by qwen3_next.rs and qwen3_5.rs
//! (mlx-lm's qwen3_5.py reuses qwen3_next.py's layers the same way): the
//! resolved settings ([`Hybrid`], checked by name), gated full attention, the
//! DeltaNet layer over plugins/nn's gated_delta.rs, the MLP / MoE feed-forward
//! with a shared expert, the pre-norm block and the model. Each model_type's
//! file parses its own config into a [`Hybrid`].
//!
//! Shapes: B batch, L new tokens, D hidden, H query heads, K kv heads,
//! hd head_dim, Hk/Hv linear key/value heads, Dk/Dv their sizes,
//! E experts, V vocab, N = B*L rows: the model carries its residual stream
//! as rows [N, D] (as plugins/nn's Decoder), so every linear gets a 2-D
//! input (MLX's matmul folds a [B, L, D] input with a Flatten + Unflatten);
//! [B, L, ...] appears only where the shape means something (the heads, the
//! conv over time, the recurrence).
use mlx_rs::{nn, Array};
use rmlx_nn::decoder::{FeedForward, Mlp};
use rmlx_nn::gated_delta::{DeltaDims, GatedDeltaNet};
use rmlx_nn::moe::SparseMoe;
use rmlx_nn::shared_expert::WithSharedExpert;
use rmlx_nn::{
    finish_rows, merge_inputs, offer_hidden_rows, require_grouped_heads, require_positive, rms_norm,
    split_heads_of, Positions, Rope,
};
use rmlx_plugin_api::{
    author::{Attend, AttendOpts, EmbeddingLayer, LinearLayer, ModelImpl, Result, Weights},
    cache_kind, LayerCache, ModelSpec, PluginError,
};
use serde_json::Value;

// ---- settings ----

/// How a DeltaNet layer's inputs are projected.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Projections {
    /// qwen3_next: `in_proj_qkvz` and `in_proj_ba`, grouped per key head.
    Fused,
    /// qwen3_5: `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`.
    Split,
}

/// A hybrid's settings, resolved from either config (qwen3_next's flat
/// keys, or qwen3_5's text config).
#[derive(Debug, Clone)]
pub struct Hybrid {
    pub model_type: &'static str,
    pub hidden_size: i32,
    pub num_hidden_layers: i32,
    pub intermediate_size: i32,
    pub num_attention_heads: i32,
    pub num_key_value_heads: i32,
    pub head_dim: i32,
    pub delta: DeltaDims,
    pub num_experts: i32,
    pub num_experts_per_tok: i32,
    /// qwen3_next: MoE on layers where (i + 1) % step == 0; qwen3_5 passes 1.
    pub decoder_sparse_step: i32,
    pub mlp_only_layers: Vec<i32>,
    pub moe_intermediate_size: i32,
    pub shared_expert_intermediate_size: i32,
    pub norm_topk_prob: bool,
    pub rms_norm_eps: f32,
    pub vocab_size: i32,
    pub rope_theta: f32,
    pub partial_rotary_factor: f32,
    pub rope_scaling: Option<Value>,
    pub max_position_embeddings: i32,
    pub tie_word_embeddings: bool,
    pub full_attention_interval: i32,
    pub layer_types: Option<Vec<String>>,
    /// Biases on the attention's q/k/v/o projections (the checkpoint must
    /// have them exactly when this is set).
    pub attention_bias: bool,
    pub projections: Projections,
    /// The Hugging Face layout (qwen3_5: conv1d weights [C, 1, K];
    /// qwen3_next: experts stored one by one), which mlx-lm's sanitize
    /// rewrites at load: conv1d weights [C, 1, K] (moved to [C, K, 1]) and the RMSNorm
    /// weights of the blocks, q/k and the final norm stored as offsets from
    /// 1 (1 is added; the DeltaNet's gated norm is not shifted).
    pub hf_layout: bool,
}

impl Hybrid {
    /// An RMSNorm weight (`name`), shifted by 1 in the Hugging Face layout.
    fn norm(&self, w: &mut Weights, name: &str) -> Result<Array> {
        let t = w.tensor(name)?;
        if self.hf_layout && t.ndim() == 1 {
            return Ok(t.add(Array::from_f32(1.0).as_dtype(t.dtype())?)?);
        }
        Ok(t)
    }
}

impl Hybrid {
    /// Whether layer i mixes with gated DeltaNet (else full attention).
    pub fn is_linear(&self, i: i32) -> bool {
        (i + 1) % self.full_attention_interval != 0
    }

    /// Whether layer i's feed-forward is the MoE block (else the dense MLP).
    pub fn is_sparse(&self, i: i32) -> bool {
        !self.mlp_only_layers.contains(&i) && self.num_experts > 0 && (i + 1) % self.decoder_sparse_step == 0
    }

    /// RoPE over int(head_dim * partial_rotary_factor) dims, as mlx-lm's
    /// `initialize_rope` (default, linear, llama3 and yarn scaling).
    fn rope(&self) -> Result<Rope> {
        Rope::with_yarn(self.rope_dims(), self.rope_theta, false, self.rope_scaling.as_ref())
    }

    pub(crate) fn rope_dims(&self) -> i32 {
        (self.head_dim as f32 * self.partial_rotary_factor) as i32
    }

    /// Refuses, by name, what the hybrid code does not implement.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(m));
        let d = &self.delta;
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("linear_num_key_heads", d.k_heads),
            ("linear_num_value_heads", d.v_heads),
            ("linear_key_head_dim", d.k_dim),
            ("linear_value_head_dim", d.v_dim),
            ("full_attention_interval", self.full_attention_interval),
        ];
        require_positive(&positive)?;
        if d.conv_kernel < 2 {
            return bad(format!("linear_conv_kernel_dim must be at least 2, got {}", d.conv_kernel));
        }
        require_grouped_heads(self.num_attention_heads, self.num_key_value_heads)?;
        if d.v_heads % d.k_heads != 0 {
            return bad(format!(
                "linear_num_value_heads {} is not a multiple of linear_num_key_heads {}",
                d.v_heads, d.k_heads
            ));
        }
        let rd = self.rope_dims();
        if !(self.partial_rotary_factor > 0.0 && self.partial_rotary_factor <= 1.0) || rd < 2 || rd % 2 != 0 {
            return bad(format!(
                "partial_rotary_factor {} gives {rd} RoPE dims of head_dim {}: they must be even and in 2..=head_dim",
                self.partial_rotary_factor, self.head_dim
            ));
        }
        if self.num_experts < 0 {
            return bad(format!("num_experts must not be negative, got {}", self.num_experts));
        }
        if self.num_experts > 0 {
            if self.decoder_sparse_step < 1 {
                return bad(format!("decoder_sparse_step must be at least 1, got {}", self.decoder_sparse_step));
            }
            if !(1..=self.num_experts).contains(&self.num_experts_per_tok) {
                return bad(format!(
                    "num_experts_per_tok {} must be in 1..={} (num_experts)",
                    self.num_experts_per_tok, self.num_experts
                ));
            }
            if self.moe_intermediate_size <= 0 || self.shared_expert_intermediate_size <= 0 {
                return bad(format!(
                    "moe_intermediate_size ({}) and shared_expert_intermediate_size ({}) must be positive",
                    self.moe_intermediate_size, self.shared_expert_intermediate_size
                ));
            }
        }
        let dense_layers = (0..self.num_hidden_layers).any(|i| !self.is_sparse(i));
        if dense_layers && self.intermediate_size <= 0 {
            return bad(format!("intermediate_size must be positive, got {}", self.intermediate_size));
        }
        if let Some(types) = &self.layer_types {
            let want = |i: i32| if self.is_linear(i) { "linear_attention" } else { "full_attention" };
            if types.len() != self.num_hidden_layers as usize {
                return bad(format!("layer_types has {} entries for {} layers", types.len(), self.num_hidden_layers));
            }
            if let Some((i, t)) = types.iter().enumerate().find(|(i, t)| t.as_str() != want(*i as i32)) {
                return bad(format!(
                    "layer_types[{i}] is `{t}` but full_attention_interval {} makes it `{}` (mlx-lm's {} follows the interval)",
                    self.full_attention_interval,
                    want(i as i32),
                    self.model_type
                ));
            }
        }
        self.rope()?; // refuses rope_scaling types by name
        Ok(())
    }
}

// ---- attention ----

/// Gated full attention (mlx-lm's `Qwen3NextAttention`).
pub struct GatedAttention {
    q_proj: LinearLayer, // [D] -> [H*2*hd]: per head, queries then gate
    k_proj: LinearLayer, // [D] -> [K*hd]
    v_proj: LinearLayer, // [D] -> [K*hd]
    o_proj: LinearLayer, // [H*hd] -> [D]
    q_norm: Array,       // [hd]
    k_norm: Array,       // [hd]
    rope: Rope,          // over the first hd * partial_rotary_factor dims
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    eps: f32,
}

impl GatedAttention {
    fn load(w: &mut Weights, p: &str, c: &Hybrid) -> Result<Self> {
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            let has = w.contains(&format!("{p}.{n}.bias"));
            if has != c.attention_bias {
                return Err(PluginError::config(format!(
                    "{p}.{n}: attention_bias is {} but the checkpoint {} a bias",
                    c.attention_bias,
                    if has { "has" } else { "has no" }
                )));
            }
        }
        Ok(Self {
            q_proj: w.linear(&format!("{p}.q_proj"))?,
            k_proj: w.linear(&format!("{p}.k_proj"))?,
            v_proj: w.linear(&format!("{p}.v_proj"))?,
            o_proj: w.linear(&format!("{p}.o_proj"))?,
            q_norm: c.norm(w, &format!("{p}.q_norm.weight"))?,
            k_norm: c.norm(w, &format!("{p}.k_norm.weight"))?,
            rope: c.rope()?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            eps: c.rms_norm_eps,
        })
    }

    /// x: [N, D] -> [N, D], or [B, L, D] -> [B, L, D]; `bl` = (B, L).
    fn forward(&self, x: &Array, bl: (i32, i32), layer: u32, pos: &Positions, attn: &mut dyn Attend) -> Result<Array> {
        let (b, l) = bl;
        let qg = self.q_proj.forward(x)?.reshape(&[b, l, self.heads, 2 * self.head_dim])?; // [B, L, H, 2hd]
        let mut parts = qg.split_at_indices(&[self.head_dim], -1)?; // 2 x [B, L, H, hd]
        let gate = parts.pop().expect("two parts"); // [B, L, H, hd]
        let q = rms_norm(&parts.pop().expect("two parts"), &self.q_norm, self.eps)?.transpose_axes(&[0, 2, 1, 3])?; // [B, H, L, hd]
        let k = split_heads_of(&self.k_proj.forward(x)?, bl, self.kv_heads)?; // [B, K, L, hd]
        let k = rms_norm(&k, &self.k_norm, self.eps)?;
        let v = split_heads_of(&self.v_proj.forward(x)?, bl, self.kv_heads)?; // [B, K, L, hd]
        let q = self.rope.apply_at(&q, pos)?;
        let k = self.rope.apply_at(&k, pos)?;
        let scale = (self.head_dim as f32).powf(-0.5);
        let o = attn.attend(layer, q, k, v, &AttendOpts::plain(scale))?; // [B, H, L, hd]
        // gated per head, then merged: [B, H, L, hd] -> [B, L, H, hd] -> [N | B, L, H*hd]
        let o = o.transpose_axes(&[0, 2, 1, 3])?.multiply(nn::sigmoid(&gate)?)?;
        self.o_proj.forward(&o.reshape(&lead_of(x, bl))?)
    }
}

/// The shape that keeps x's leading axes and flattens the rest: [N, -1] for
/// rows [N, D], [B, L, -1] for [B, L, D].
fn lead_of(x: &Array, (b, l): (i32, i32)) -> Vec<i32> {
    if x.ndim() == 2 {
        vec![b * l, -1]
    } else {
        vec![b, l, -1]
    }
}

/// [B, L, ...] from rows [N, ...]; an input already [B, L, ...] as it is.
fn unfold_rows(t: Array, (b, l): (i32, i32), rows: bool) -> Result<Array> {
    if !rows {
        return Ok(t);
    }
    let mut shape = vec![b, l];
    shape.extend_from_slice(&t.shape()[1..]);
    Ok(t.reshape(&shape)?)
}

// ---- DeltaNet ----

/// The input projections of a gated DeltaNet layer.
enum DeltaInput {
    /// qwen3_next: qkvz [D] -> [2*Hk*Dk + 2*Hv*Dv] and ba [D] -> [2*Hv], each
    /// grouped per key head (q, k, v, z and b, a of that head's group).
    Fused { qkvz: LinearLayer, ba: LinearLayer },
    /// qwen3_5: qkv [D] -> [C], z [D] -> [Hv*Dv], b and a [D] -> [Hv].
    Split { qkv: LinearLayer, z: LinearLayer, b: LinearLayer, a: LinearLayer },
}

pub struct DeltaLayer {
    input: DeltaInput,
    net: GatedDeltaNet,
}

impl DeltaLayer {
    fn load(w: &mut Weights, p: &str, c: &Hybrid) -> Result<Self> {
        let lin = |w: &mut Weights, n: &str| w.linear(&format!("{p}.{n}"));
        let input = match c.projections {
            Projections::Fused => DeltaInput::Fused { qkvz: lin(w, "in_proj_qkvz")?, ba: lin(w, "in_proj_ba")? },
            Projections::Split => DeltaInput::Split {
                qkv: lin(w, "in_proj_qkv")?,
                z: lin(w, "in_proj_z")?,
                b: lin(w, "in_proj_b")?,
                a: lin(w, "in_proj_a")?,
            },
        };
        Ok(Self { input, net: GatedDeltaNet::load_layout(w, p, c.delta, c.hf_layout)? })
    }

    /// x: [N, D] -> [N, D], or [B, L, D] -> [B, L, D]; `bl` = (B, L).
    fn forward(&self, x: &Array, bl: (i32, i32), layer: u32, attn: &mut dyn Attend) -> Result<Array> {
        let d = self.net.dims();
        let (bsz, l) = bl;
        let rows = x.ndim() == 2;
        let (qkv, z, b, a) = match &self.input {
            DeltaInput::Fused { qkvz, ba } => {
                // mlx-lm's fix_query_key_value_ordering: per key head, the
                // group holds q [Dk], k [Dk], v [r*Dv], z [r*Dv] (r = Hv/Hk).
                let (nk, r) = (d.k_heads, d.v_heads / d.k_heads);
                let g = qkvz.forward(x)?.reshape(&[bsz, l, nk, -1])?; // [B, L, Hk, 2Dk + 2rDv]
                let s = g.split_at_indices(&[d.k_dim, 2 * d.k_dim, 2 * d.k_dim + r * d.v_dim], -1)?;
                let flat = |t: &Array| t.reshape(&[bsz, l, -1]);
                let qkv = rmlx_nn::concatenate(&[flat(&s[0])?, flat(&s[1])?, flat(&s[2])?], -1)?; // [B, L, C]
                let z = s[3].reshape(&[bsz * l, d.value_dim()])?; // [N, Hv*Dv]
                let ba = ba.forward(x)?.reshape(&[bsz, l, nk, -1])?; // [B, L, Hk, 2r]
                let s = ba.split_at_indices(&[r], -1)?;
                (qkv, z, s[0].reshape(&[bsz, l, d.v_heads])?, s[1].reshape(&[bsz, l, d.v_heads])?)
            }
            DeltaInput::Split { qkv, z, b, a } => (
                unfold_rows(qkv.forward(x)?, bl, rows)?,               // [B, L, C]
                z.forward(x)?,                                         // [N | B, L, Hv*Dv]
                unfold_rows(b.forward(x)?, bl, rows)?,                 // [B, L, Hv]
                unfold_rows(a.forward(x)?, bl, rows)?,                 // [B, L, Hv]
            ),
        };
        let (qkv, b, a) = mask_padding(qkv, b, a, attn)?;
        let y = self.net.mix(&qkv, &z, &b, &a, layer, attn)?; // [N, D]
        unfold_rows(y, bl, !rows) // back to x's rank: [N, D] | [B, L, D]
    }
}

/// What `a` and `b` become at padding: softplus(-1e4 + dt_bias) is 0, so
/// the decay exp(-exp(A_log) * 0) is exactly 1, and sigmoid(-1e4) is 0
/// (beta 0: nothing is written). Finite, so every dtype holds it.
const PAD_GATE: f32 = -1e4;

/// Ragged rows (the host's batched prefill, `PagedForward::ragged`): rows
/// are LEFT-padded to the longest, and a padded row's positions start below
/// 0 (`Attend::offsets` is its cached tokens minus its padding), so column i
/// of row b is padding where offsets[b] + i < 0. There the conv input is
/// zero and the recurrence leaves the state as it was (decay 1, beta 0;
/// mlx-lm's `mx.where(mask, ...)` on `mixed_qkv` and the state). With a
/// fresh row (zero conv state) this is exact: the conv sees zeros before
/// the row's first token either way. A row that resumes a state never
/// comes padded (the host pads only rows that start fresh; offsets >= 0
/// then mask nothing). One row or one token per row has no padding.
/// qkv [B, L, C], b, a [B, L, Hv] -> the same, masked.
fn mask_padding(qkv: Array, b: Array, a: Array, attn: &dyn Attend) -> Result<(Array, Array, Array)> {
    let (bsz, l) = (qkv.dim(0), qkv.dim(1));
    if bsz == 1 || l == 1 {
        return Ok((qkv, b, a));
    }
    let cols = mlx_rs::ops::arange::<_, i32>(0, l, None)?.reshape(&[1, l])?; // [1, L]
    let pos = attn.offsets().reshape(&[bsz, 1])?.add(&cols)?; // [B, L]: each column's position
    let real = pos.ge(Array::from_int(0))?.expand_dims(-1)?; // bool [B, L, 1]
    let qkv = mlx_rs::ops::select(&real, &qkv, Array::from_f32(0.0).as_dtype(qkv.dtype())?)?;
    let gate = |x: &Array| -> Result<Array> {
        Ok(mlx_rs::ops::select(&real, x, Array::from_f32(PAD_GATE).as_dtype(x.dtype())?)?)
    };
    Ok((qkv, gate(&b)?, gate(&a)?))
}

// ---- MLP / MoE ----

/// Layer i's feed-forward under `p` (`...layers.{i}.mlp`): x [..., D] -> [..., D].
fn feed_forward(w: &mut Weights, c: &Hybrid, i: i32, p: &str) -> Result<Box<dyn FeedForward>> {
    if !c.is_sparse(i) {
        return Ok(Box::new(Mlp::load(w, p)?)); // [D] -> [intermediate_size] -> [D]
    }
    // E x ([D] -> [moe_intermediate_size] -> [D]), k per token
    let routed = SparseMoe::load(w, p, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob)?;
    // + sigmoid(shared_expert_gate(x)) * shared_expert(x)
    Ok(Box::new(WithSharedExpert::load(w, p, Box::new(routed))?))
}

// ---- block ----

enum Mixer {
    Attention(GatedAttention),
    Delta(DeltaLayer),
}

/// Pre-norm block: h = x + mixer(norm(x)); out = h + mlp(norm(h)).
pub struct HybridBlock {
    mixer: Mixer,
    mlp: Box<dyn FeedForward>,
    input_layernorm: Array,          // [D]
    post_attention_layernorm: Array, // [D]
    eps: f32,
}

impl HybridBlock {
    pub(crate) fn load(w: &mut Weights, c: &Hybrid, i: i32, p: &str) -> Result<Self> {
        let mixer = if c.is_linear(i) {
            Mixer::Delta(DeltaLayer::load(w, &format!("{p}.linear_attn"), c)?)
        } else {
            Mixer::Attention(GatedAttention::load(w, &format!("{p}.self_attn"), c)?)
        };
        Ok(Self {
            mixer,
            mlp: feed_forward(w, c, i, &format!("{p}.mlp"))?,
            input_layernorm: c.norm(w, &format!("{p}.input_layernorm.weight"))?,
            post_attention_layernorm: c.norm(w, &format!("{p}.post_attention_layernorm.weight"))?,
            eps: c.rms_norm_eps,
        })
    }

    /// x: [N, D], N = B*L -> [N, D], or [B, L, D] -> [B, L, D]; `bl` = (B, L).
    pub(crate) fn forward(&self, x: &Array, bl: (i32, i32), layer: u32, pos: &Positions, attn: &mut dyn Attend) -> Result<Array> {
        let n = rms_norm(x, &self.input_layernorm, self.eps)?;
        let r = match &self.mixer {
            Mixer::Attention(a) => a.forward(&n, bl, layer, pos, attn)?,
            Mixer::Delta(d) => d.forward(&n, bl, layer, attn)?,
        };
        let h = x.add(&r)?;
        let r = self.mlp.forward(&rms_norm(&h, &self.post_attention_layernorm, self.eps)?)?;
        Ok(h.add(&r)?)
    }
}

// ---- model ----

/// Embedding, hybrid blocks, final norm and head; qwen3_5 reuses it under
/// its `language_model.` prefix.
pub struct HybridModel {
    config: Hybrid,
    embed_tokens: EmbeddingLayer, // [V, D]
    layers: Vec<HybridBlock>,
    norm: Array,                  // [D]
    lm_head: Option<LinearLayer>, // [D] -> [V]; None when tied
}

impl HybridModel {
    /// `model`: the prefix of `embed_tokens`, `layers` and `norm` ("model."
    /// for qwen3_next, "language_model.model." for qwen3_5); `head`: the
    /// output head's module ("lm_head", "language_model.lm_head").
    pub fn load(c: Hybrid, w: &mut Weights, model: &str, head: &str) -> Result<Self> {
        let embed_tokens = w.embedding(&format!("{model}embed_tokens"))?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| HybridBlock::load(w, &c, i, &format!("{model}layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let norm = c.norm(w, &format!("{model}norm.weight"))?;
        // mlx-lm's sanitize drops `lm_head` when tied (and `mtp.*`, the
        // multi-token-prediction head, which is left unread here).
        let head = head.to_string();
        let tied = c.tie_word_embeddings || !w.contains(&format!("{head}.weight"));
        let lm_head = if tied { None } else { Some(w.linear(&head)?) };
        Ok(Self { config: c, embed_tokens, layers, norm, lm_head })
    }
}

impl Hybrid {
    /// The cache spec of a model of these settings.
    pub(crate) fn model_spec(&self) -> ModelSpec {
        ModelSpec {
            num_layers: self.num_hidden_layers as u32,
            num_kv_heads: self.num_key_value_heads as u32,
            head_dim: self.head_dim as u32,
            vocab_size: self.vocab_size as u32,
            hidden_size: self.hidden_size as u32,
            max_context: self.max_position_embeddings.max(0) as u32,
            sliding_window: vec![0u32; self.num_hidden_layers as usize].into(),
        }
    }

    /// DeltaNet layers keep a recurrent state; attention layers full K/V.
    pub(crate) fn layer_caches(&self) -> Vec<LayerCache> {
        (0..self.num_hidden_layers)
            .map(|i| {
                let full = LayerCache {
                    kind: cache_kind::FULL,
                    window: 0,
                    kv_heads: self.num_key_value_heads as u32,
                    head_dim: self.head_dim as u32,
                    shared_with: 0,
                };
                if self.is_linear(i) {
                    LayerCache { kind: cache_kind::STATE, kv_heads: 0, head_dim: 0, ..full }
                } else {
                    full
                }
            })
            .collect()
    }
}

impl ModelImpl for HybridModel {
    // ---- cache spec ----
    fn spec(&self) -> ModelSpec {
        self.config.model_spec()
    }

    fn layers(&self) -> Vec<LayerCache> {
        self.config.layer_caches()
    }

    /// tokens: [B, L] -> logits [B, L | 1, V], or hidden states [B, L, D]
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        let pos = Positions::of(attn); // each row's first position
        let bl = (tokens.dim(0), tokens.dim(1));
        let h = merge_inputs(self.embed_tokens.lookup(tokens)?, attn)?; // [B, L, D]
        let mut h = h.reshape(&[bl.0 * bl.1, -1])?; // [N, D]
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, bl, i as u32, &pos, attn)?;
            offer_hidden_rows(attn, i as u32, &h, bl)?;
        }
        let h = rms_norm(&h, &self.norm, self.config.rms_norm_eps)?; // [N, D]
        finish_rows(h, bl, attn, |h| match &self.lm_head {
            Some(head) => head.forward(h),
            None => self.embed_tokens.as_linear(h),
        })
    }
}
