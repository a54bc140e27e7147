//! The hybrid's pre-norm block: its mixer (hybrid_attention.rs's gated
//! attention or hybrid_delta.rs's DeltaNet layer, by the layer's index) and
//! its feed-forward (the dense MLP, or the MoE with a shared expert).
//!
//! Shapes: B batch, L new tokens, D hidden, H query heads, K kv heads,
//! hd head_dim, Hk/Hv linear key/value heads, Dk/Dv their sizes,
//! E experts, V vocab, N = B*L rows: the model carries its residual stream
//! as rows [N, D] (as plugins/nn's Decoder), so every linear gets a 2-D
//! input (MLX's matmul folds a [B, L, D] input with a Flatten + Unflatten);
//! [B, L, ...] appears only where the shape means something (the heads, the
//! conv over time, the recurrence).
use mlx_rs::Array;
use rmlx_nn::decoder::{pre_norm_residual, FeedForward, Mlp};
use rmlx_nn::moe::SparseMoe;
use rmlx_nn::shared_expert::WithSharedExpert;
use rmlx_nn::Positions;
use rmlx_plugin_api::author::{Attend, Result, Weights};

use crate::hybrid::Hybrid;
use crate::hybrid_attention::GatedAttention;
use crate::hybrid_delta::DeltaLayer;

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
        let norms = (&self.input_layernorm, &self.post_attention_layernorm);
        let mixer = |n: &Array| match &self.mixer {
            Mixer::Attention(a) => a.forward(n, bl, layer, pos, attn),
            Mixer::Delta(d) => d.forward(n, bl, layer, attn),
        };
        pre_norm_residual(x, norms, self.eps, mixer, &*self.mlp)
    }
}
