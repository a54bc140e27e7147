//! The gated DeltaNet hybrid decoder shared by qwen3_next.rs and qwen3_5.rs
//! (mlx-lm's qwen3_5.py reuses qwen3_next.py's layers the same way): the
//! resolved settings ([`Hybrid`], checked by name), the model and its cache
//! spec here; gated full attention in hybrid_attention.rs, the DeltaNet
//! layer over plugins/nn's gated_delta.rs in hybrid_delta.rs, the MLP / MoE
//! feed-forward with a shared expert and the pre-norm block in
//! hybrid_block.rs. Each model_type's file parses its own config into a
//! [`Hybrid`].
//!
//! Shapes: B batch, L new tokens, D hidden, H query heads, K kv heads,
//! hd head_dim, Hk/Hv linear key/value heads, Dk/Dv their sizes,
//! E experts, V vocab, N = B*L rows: the model carries its residual stream
//! as rows [N, D] (as plugins/nn's Decoder), so every linear gets a 2-D
//! input (MLX's matmul folds a [B, L, D] input with a Flatten + Unflatten);
//! [B, L, ...] appears only where the shape means something (the heads, the
//! conv over time, the recurrence).
use mlx_rs::Array;
use rmlx_nn::gated_delta::DeltaDims;
use rmlx_nn::{
    finish_rows, merge_inputs, offer_hidden_rows, require_grouped_heads, require_positive, rms_norm, Positions, Rope,
};
use rmlx_plugin_api::{
    author::{Attend, EmbeddingLayer, LinearLayer, ModelImpl, Result, Weights},
    cache_kind, LayerCache, ModelSpec, PluginError,
};
use serde_json::Value;

use crate::hybrid_block::HybridBlock;

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
    pub(crate) fn norm(&self, w: &mut Weights, name: &str) -> Result<Array> {
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
    pub(crate) fn rope(&self) -> Result<Rope> {
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
